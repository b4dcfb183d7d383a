"""
On-demand start (issue 11, item 3; issue 19, item 1) under a real systemd: a
user whose rootless Docker is set up and enabled, but not running and not
lingering, gets C{docker ps} right on the first try through the router
started with C{start = "systemd"}, also a second after their last session
ended; a user who enabled nothing gets no manager started.
"""

import time

import pytest
from conftest import IMAGE, installedMachine, pollUntil

USER = "dr-frank"
NOT_SET_UP = "dr-gina"
# Logs in and out during the tests.
LOGGED_OUT = "dr-hank"
# logind stops a user manager this long after the user's last session
# (UserStopDelaySec=), if it still knows the user.
USER_STOP_DELAY = 10


@pytest.fixture(scope="module")
def m(release):
    with installedMachine(release, daemons=[USER, LOGGED_OUT], others=[NOT_SET_UP]) as machine:
        for user in (USER, LOGGED_OUT):
            loggedOut(machine, user)
        machine.run("mkdir -p /etc/docker-router && "
                    "echo 'start = \"systemd\"' >/etc/docker-router/docker-router.toml && "
                    "systemctl restart docker-router")
        yield machine


def loggedOut(m, user):
    """
    Set up and enabled, then no linger and logged out: nothing of the user
    runs, and logind has forgotten them.
    """
    m.run(f"loginctl disable-linger {user} && loginctl terminate-user {user}")
    pollUntil(lambda: m.run(f"test -e /run/user/{m.uids[user]} || loginctl show-user {user}",
                            check=False).returncode != 0,
              60, f"{user}'s user manager and runtime directory gone, and logind done with them")


def isActive(m, unit):
    return m.run(f"systemctl is-active {unit}", check=False).stdout.strip()


def startLines(m):
    return [line for line in m.run("journalctl -u docker-router --no-pager -o cat").stdout.splitlines()
            if line.startswith("start: ")]


def test_firstDockerPsStartsTheDaemon(m):
    uid = m.uids[USER]
    assert isActive(m, f"user@{uid}.service") == "inactive"
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
    assert isActive(m, f"user@{uid}.service") == "active"
    assert m.run("docker ps -q", user=USER).returncode == 0
    assert len([line for line in startLines(m) if f"user {USER} " in line]) == 1


def test_rightAfterTheLastSessionEnded(m):
    """
    A second after the user's last session ended (with their daemon
    stopped), logind still has their manager and stops it after its stop
    delay: the router waits that teardown out and starts a manager of its
    own, which stays, instead of a daemon that dies with the old one (or a
    start that hangs on a runtime directory being removed).
    """
    uid = m.uids[LOGGED_OUT]
    session = m.login(LOGGED_OUT, "systemctl --user stop docker")
    assert session.returncode == 0, session.stderr
    time.sleep(1)  # the scenario: a cron job a second after logout
    assert m.run(f"loginctl show-user {LOGGED_OUT} --property=State --value").stdout.strip() == "closing"
    ps = m.run("docker ps --format '{{.ID}}'", user=LOGGED_OUT, check=False, timeout=60)
    assert (ps.returncode, ps.stdout, ps.stderr) == (0, "", ""), startLines(m)
    assert any(f"started docker.service of user {LOGGED_OUT}" in line for line in startLines(m))
    # Past logind's stop delay, the manager and the daemon are still there.
    time.sleep(USER_STOP_DELAY + 2)
    assert isActive(m, f"user@{uid}.service") == "active"
    assert m.run("docker ps -q", user=LOGGED_OUT, timeout=60).returncode == 0


def test_notSetUp(m):
    """
    A user who enabled no daemon is told so, at once, with the setup
    command, and their manager is not started for nothing.
    """
    uid = m.uids[NOT_SET_UP]
    ps = m.run("docker ps", user=NOT_SET_UP, check=False, timeout=60)
    assert ps.returncode != 0
    assert "has enabled none of docker.service or podman.socket" in ps.stderr, ps.stderr
    assert "dockerd-rootless-setuptool.sh install --force" in ps.stderr
    assert any(line.startswith(f"start: not-enabled for user {NOT_SET_UP}") for line in startLines(m))
    assert isActive(m, f"user@{uid}.service") == "inactive"


def test_neverForSystemAccounts(m):
    """root (below UID_MIN) is never started: the usual answer."""
    ps = m.run("docker ps", check=False, timeout=60)
    assert "No Docker daemon is running for user root" in ps.stderr, ps.stderr
    assert any("not starting a daemon for user root (uid 0): uid 0 is below UID_MIN" in line
               for line in startLines(m))
