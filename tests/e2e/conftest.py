"""
Fixtures for the end-to-end tests: real rootless Docker daemons (started by
C{.ci/rootless-docker.sh start}), the real router process, and the docker CLI
run as a test user.

Every test that goes through the router also runs the same thing straight
against the user's own daemon socket (the C{via} parameter, C{direct} and
C{router}), so a failure that only C{router} shows points at the router.

Without C{DOCKERROUTER_E2E=1} the tests skip when the daemons are missing; with
it, a missing daemon is a failure. As root::

    bash .ci/rootless-docker.sh start
    DOCKERROUTER_E2E=1 $VENV/bin/python -m pytest tests/e2e
    bash .ci/rootless-docker.sh stop
"""

import os
import shutil
import signal
import stat
import tempfile

import pytest

from tests.e2e.harness import (
    DAEMON_USERS,
    IMAGE,
    NO_DAEMON_USER,
    VENV_BIN,
    Docker,
    User,
    pingSocket,
    startRouter,
    whichDocker,
)
from tests.integration.harness import twistdCommand

REQUIRED = os.environ.get("DOCKERROUTER_E2E") == "1"


def _unavailable(reason: str):
    """Fail or skip, as DOCKERROUTER_E2E says."""
    if REQUIRED:
        pytest.fail(f"DOCKERROUTER_E2E=1 but {reason} (run .ci/rootless-docker.sh start as root)", pytrace=False)
    pytest.skip(f"end-to-end environment unavailable: {reason}; set DOCKERROUTER_E2E=1 to make this a failure")


@pytest.fixture(scope="session")
def tmpRoot():
    """
    A directory other uids can traverse (pytest's own tmp_path is 0700 root's).
    """
    root = tempfile.mkdtemp(prefix="dockerrouter-e2e-")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def environment(tmpRoot):
    """
    The test users, once we know everything the tests need is there.
    """
    if os.geteuid() != 0:
        _unavailable("the tests must run as root (they run clients as the test users)")
    problems = []
    if whichDocker() is None:
        problems.append("no docker CLI on PATH")
    if not os.access(twistdCommand()[0], os.X_OK):
        problems.append(f"no {twistdCommand()[0]}")
    if not (VENV_BIN / "python").exists():
        problems.append(f"no {VENV_BIN / 'python'}")
    if not stat.S_ISCHR(os.stat("/dev/null").st_mode):
        # A twistd given --logfile=/dev/null rotates it into a plain file;
        # containers then lose their output without any error.
        problems.append("/dev/null is not a character device")
    users = {}
    for name in DAEMON_USERS + (NO_DAEMON_USER,):
        try:
            users[name] = User.make(name, tmpRoot)
        except KeyError:
            problems.append(f"no user {name}")
    for name in DAEMON_USERS:
        if name in users:
            why = pingSocket(users[name].ownSocket)
            if why:
                problems.append(f"{name}'s daemon does not answer: {why}")
    if problems:
        _unavailable("; ".join(problems))
    return users


@pytest.fixture(scope="session")
def router(environment, tmpRoot):
    """
    The real router, listening on a socket any user may connect to, with the
    default backend template /run/user/{uid}/docker.sock.
    """
    process = startRouter(tmpRoot)
    yield process
    status = process.stop()
    # Problems the clients never saw are findings too. (twistd ends itself
    # with the signal it stopped for, once it has shut down cleanly.)
    assert status in (0, -signal.SIGTERM), f"router exited {status} on SIGTERM\n{process.evidence()}"
    assert "Traceback" not in process.log(), f"the router logged a traceback\n{process.evidence()}"


@pytest.fixture(params=["direct", "router"])
def via(request):
    """
    C{direct}: the control, straight to the user's own daemon. C{router}:
    through the router.
    """
    return request.param


@pytest.fixture
def dockerAs(request, via, environment):
    """
    C{dockerAs(name)}: the docker CLI as that test user, via the socket this
    test runs against.
    """
    cli = whichDocker()

    def make(name: str) -> Docker:
        user = environment[name]
        if via == "router":
            socketPath = request.getfixturevalue("router").listenPath
        else:
            socketPath = user.ownSocket
        return Docker(cli, user, socketPath, via)

    return make


@pytest.fixture
def alice(dockerAs):
    return dockerAs("dr-alice")


@pytest.fixture
def bob(dockerAs):
    return dockerAs("dr-bob")


@pytest.fixture
def image():
    return IMAGE
