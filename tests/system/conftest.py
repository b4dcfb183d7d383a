"""
Fixtures for the system tests: a booted Debian machine (L{machine.Machine}),
once for each release README.md is tested on (L{machine.RELEASES}), and the
steps of README.md run in it.

Plain pytest functions, not pytest-twisted: every step is a command in the
machine that must finish before the next, and the one concurrent part (two
users' C{docker ps} loops during restarts) is a pair of child processes; a
reactor would add nothing but a second way to wait.

Without C{DOCKERROUTER_SYSTEM=1} the tests skip; with it, a missing
C{systemd-nspawn} or C{mmdebstrap} (or not being root) is a failure. As root::

    apt-get install -y mmdebstrap systemd-container
    DOCKERROUTER_SYSTEM=1 .venv/bin/python -m pytest -p no:cacheprovider tests/system
"""

import os
from contextlib import contextmanager
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import readme  # noqa: E402
from tests.integration import harness  # noqa: E402
from machine import RELEASES, Machine, missingTools  # noqa: E402

REQUIRED = os.environ.get("DOCKERROUTER_SYSTEM") == "1"
IMAGE = "dr-busybox:latest"
DAEMON_DEADLINE = 60


def _available():
    if not REQUIRED:
        pytest.skip("system tests boot Debian machines: set DOCKERROUTER_SYSTEM=1 (as root) to run them")
    problems = missingTools()
    if os.geteuid() != 0:
        problems.append("root")
    if problems:
        pytest.fail(f"DOCKERROUTER_SYSTEM=1 but missing: {', '.join(problems)} "
                    "(apt-get install mmdebstrap systemd-container; run as root)", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """
    A failed test's report ends with the journal of the machine it used.
    """
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Machine) and value.leader is not None:
                units = "-u docker-router.socket -u docker-router.service"
                tail = value.run(f"journalctl --no-pager -n 150 {units}", check=False).stdout
                report.sections.append(("docker-router units in the machine's journal", tail))


@pytest.fixture(scope="module", params=RELEASES)
def release(request):
    """
    Each Debian release in turn (a module's tests all run on one, then on
    the next).
    """
    return request.param


@pytest.fixture
def machine(release):
    """
    A freshly booted machine of C{release}, removed after the test.
    """
    _available()
    m = Machine(release)
    try:
        yield m.boot()
    finally:
        m.shutdown()


def pollUntil(check, deadline, what):
    """
    The harnesses' one polling loop, at a pace for commands run in the
    machine (each a process).
    """
    return harness.pollUntil(check, deadline, interval=0.1, what=what)


def installRouter(m):
    """
    README's install command, as root, in the clone of the repository.
    """
    m.run("cd /root/docker-router && " + readme.installRouter(), timeout=600)


def installDocker(m):
    """
    README's per-host rootless Docker packages, as root.
    """
    m.run(readme.installDocker(), timeout=600)


def addUser(m, name, daemon=True):
    """
    A new user (no C{sudo}) who, logged in, runs README's per-user steps
    verbatim, lingered by the admin as README says, and then has the busybox
    image, imported through the router.

    @return: the user's uid.
    """
    m.run(f"useradd --create-home --shell /bin/bash {name}")
    uid = int(m.run(f"id -u {name}").stdout)
    if not daemon:
        return uid
    setup = m.login(name, readme.userSetup())
    m.run(readme.linger(name))
    status = m.run(f"loginctl show-user {name} -p Linger; XDG_RUNTIME_DIR=/run/user/{uid} "
                   "systemctl --user is-enabled docker", user=name, check=False).stdout
    assert status.split() == ["Linger=yes", "enabled"], (
        f"{name} after README's steps: {status}\n{setup.stdout}\n{setup.stderr}")
    # The user unit is Type=simple: enabled and started, it answers a moment later.
    pollUntil(lambda: m.run(f"test -S /run/user/{uid}/docker.sock", check=False).returncode == 0,
              DAEMON_DEADLINE, f"{name}'s rootless dockerd at /run/user/{uid}/docker.sock\n"
                               f"{setup.stdout}\n{setup.stderr}")
    tar = m.run("cd /root/docker-router && DR_E2E_STATE=/var/tmp/dr bash .ci/rootless-docker.sh rootfs "
                "&& chmod 0644 /var/tmp/dr/*.tar").stdout.strip()
    m.run(f"docker import - {IMAGE} <{tar}", user=name, timeout=120)
    return uid


@contextmanager
def installedMachine(release, daemons=(), others=()):
    """
    A booted machine of C{release} with the router and the rootless Docker packages
    installed as README.md says, users who set up their daemons with
    README's per-user steps (C{daemons}) and users who did not
    (C{others}); C{.uids} maps their names to uids. Removed afterwards.
    """
    _available()
    m = Machine(release)
    try:
        m.boot()
        installRouter(m)
        installDocker(m)
        m.uids = {name: addUser(m, name) for name in daemons}
        m.uids.update({name: addUser(m, name, daemon=False) for name in others})
        yield m
    finally:
        m.shutdown()
