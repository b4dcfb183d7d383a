"""
On-demand start (issue 11, item 3) under a real systemd: a user whose
rootless Docker is set up and enabled, but not running and not lingering,
gets C{docker ps} right on the first try through the router started with
C{start = "systemd"}.
"""

import time

import pytest
from conftest import IMAGE, installedMachine, pollUntil

USER = "dr-frank"
NOT_SET_UP = "dr-gina"
# logind stops a user manager this long after the user's last session
# (UserStopDelaySec=), if it still knows the user.
USER_STOP_DELAY = 10


@pytest.fixture(scope="module")
def m(release):
    with installedMachine(release, daemons=[USER], others=[NOT_SET_UP]) as machine:
        uid = machine.uids[USER]
        # Set up and enabled, then no linger and logged out: nothing of the
        # user runs, and logind has forgotten them.
        machine.run(f"loginctl disable-linger {USER} && loginctl terminate-user {USER}")
        pollUntil(lambda: machine.run(f"test -e /run/user/{uid} || loginctl show-user {USER}",
                                      check=False).returncode != 0,
                  60, f"{USER}'s user manager and runtime directory gone, and logind done with them")
        machine.run("mkdir -p /etc/docker-router && "
                    "echo 'start = \"systemd\"' >/etc/docker-router/docker-router.toml && "
                    "systemctl restart docker-router")
        yield machine


def startLines(m):
    return [line for line in m.run("journalctl -u docker-router --no-pager -o cat").stdout.splitlines()
            if line.startswith("start: ")]


def test_firstDockerPsStartsTheDaemon(m):
    uid = m.uids[USER]
    assert m.run(f"systemctl is-active user@{uid}.service", check=False).stdout.strip() == "inactive"
    # A plain process of the user (no login session), as a cron job would be.
    ps = m.run("docker ps --format '{{.ID}}'", user=USER, check=False, timeout=60)
    assert (ps.returncode, ps.stdout, ps.stderr) == (0, "", ""), startLines(m)
    [line] = startLines(m)
    assert f"started docker.service of user {USER} (uid {uid})" in line
    print(line)  # how long the start took (pytest -s shows it)
    ran = m.run(f"docker run --rm {IMAGE} echo started on demand", user=USER, timeout=120)
    assert ran.stdout == "started on demand\n"
    # It keeps running: logind, which has no session of the user, doesn't
    # stop the manager the router started (waiting out its stop delay).
    time.sleep(USER_STOP_DELAY + 2)
    assert m.run(f"systemctl is-active user@{uid}.service", check=False).stdout.strip() == "active"
    assert m.run("docker ps -q", user=USER).returncode == 0
    assert len(startLines(m)) == 1


def test_notSetUp(m):
    """A user who enabled no daemon is told so, at once, with the setup command."""
    ps = m.run("docker ps", user=NOT_SET_UP, check=False, timeout=60)
    assert ps.returncode != 0
    assert "has enabled none of docker.service or podman.socket" in ps.stderr, ps.stderr
    assert "dockerd-rootless-setuptool.sh install --force" in ps.stderr
    assert any(line.startswith(f"start: not-enabled for user {NOT_SET_UP}") for line in startLines(m))


def test_neverForSystemAccounts(m):
    """root (below UID_MIN) is never started: the usual answer."""
    ps = m.run("docker ps", check=False, timeout=60)
    assert "No Docker daemon is running for user root" in ps.stderr, ps.stderr
    assert any("not starting a daemon for user root (uid 0): uid 0 is below UID_MIN" in line
               for line in startLines(m))
