"""
Restarts nobody notices (issue 18, item 1), under a real systemd: while
users hold a C{docker events} stream, a C{docker logs -f} of a container
printing a counter every 20 ms, an attached C{docker run -i} echoing a slow
stream through C{cat} and a C{docker save} of a 200 MB image read slowly,
the router is upgraded (README's install command again, from a changed
tree) and restarted five times; every stream still runs afterwards, the
counter has no gap and no repeat, the echo is byte-identical to what was
sent and the saved archive to a save made directly (every member's bytes and
header, but the time Docker 25 and later stamp on a directory), and another
user's C{docker ps} in a loop never fails nor waits over 1.5 s.

One machine for the module, set up as README.md says, with dr-alice
(events and logs), dr-bob (the echo and the save) and dr-dave (the
C{docker ps} loop), each with a rootless daemon.
"""

import time

import pytest
from conftest import IMAGE, installedMachine, installRouter, pollUntil

SERVICE = "docker-router.service"
RESTARTS = 5
# systemd allows five starts in ten seconds (StartLimitBurst=): the
# restarts are spread out.
SPACING = 2.5
ECHO_LINES = 3000
SAVE_BYTES = 200_000_000
WAIT_LIMIT_MS = 1500

# Reads standard input slowly (about 12 MB/s), so that the save is still
# running while the router restarts.
SLOW_READER = ("python3 -c 'import sys, time\n"
               "while True:\n"
               "    data = sys.stdin.buffer.read1(65536)\n"
               "    if not data: break\n"
               "    sys.stdout.buffer.write(data); time.sleep(0.005)'")

# The digest of a saved image: every member's name, type, mode, size and
# bytes, in order, but not the times in its headers: Docker 25 and later
# (Debian 13's docker.io 26) stamp the archive's blobs/sha256/ directory with
# the time of the save (moby/moby#51364), so two direct saves differ there.
ARCHIVE_DIGEST = """python3 -c '
import hashlib, sys, tarfile
digest = hashlib.sha256()
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as archive:
    for member in archive:
        digest.update(repr((member.name, member.type, member.mode, member.size, member.linkname)).encode())
        if member.isfile():
            data = archive.extractfile(member)
            for chunk in iter(lambda: data.read(65536), b""):
                digest.update(chunk)
while sys.stdin.buffer.read(65536):
    pass
print(digest.hexdigest())
'"""


@pytest.fixture(scope="module")
def m(release):
    with installedMachine(release, daemons=["dr-alice", "dr-bob", "dr-dave"]) as machine:
        yield machine


def mainPid(m):
    return int(m.run(f"systemctl show -p MainPID --value {SERVICE}").stdout)


def lines(process):
    """Everything a spawned process printed, once it has ended."""
    return process.stdout.read().splitlines()


def test_restartsAndAnUpgradeKeepEveryStream(m):
    uid = {name: m.run(f"id -u {name}").stdout.strip() for name in ("dr-alice", "dr-bob")}
    m.run(f"head -c {SAVE_BYTES} /dev/urandom >big && tar cf big.tar big && rm big "
          "&& docker import big.tar dr-big >/dev/null && rm big.tar", user="dr-bob", timeout=600)
    direct = m.run(f"DOCKER_HOST=unix:///run/user/{uid['dr-bob']}/docker.sock docker save dr-big | {ARCHIVE_DIGEST}",
                   user="dr-bob", timeout=600).stdout
    m.run(f"docker run -d --name counter {IMAGE} sh -c "
          "'i=0; while :; do echo $i; i=$((i+1)); sleep 0.02; done'", user="dr-alice")
    events = m.spawn("exec curl -sN --unix-socket /var/run/docker.sock "
                     "'http://docker/events?filters=%7B%22event%22%3A%5B%22die%22%5D%7D'", user="dr-alice")
    logs = m.spawn("exec docker logs -f counter", user="dr-alice")
    psLoop = m.spawn("rm -f ps-times; while [ ! -e /tmp/stop-ps ]; do s=$(date +%s%N); "
                     "docker ps -q >/dev/null 2>>ps-errors || echo fail >>ps-times; "
                     "echo $(( ($(date +%s%N) - s) / 1000000 )) >>ps-times; done; echo stopped", user="dr-dave")
    try:
        # The upgrade: a changed tree, README's install command again (its
        # last step restarts the router).
        before = mainPid(m)
        m.run("cd /root/docker-router && sed -i 's/^__version__ = \"\\(.*\\)\"/__version__ = \"\\1+upgrade\"/' "
              "dockerrouter/__init__.py")
        installRouter(m)
        assert mainPid(m) != before
        assert "+upgrade" in m.run("/opt/docker-router/venv/bin/twistd docker-router --version").stdout

        echo = m.spawn(f"python3 -c 'import sys, time\nfor i in range({ECHO_LINES}):\n"
                       "    print(i, flush=True); time.sleep(0.01)' "
                       f"| docker run -i --rm {IMAGE} cat >echo.out; echo echoed $?", user="dr-bob")
        save = m.spawn(f"docker save dr-big | {SLOW_READER} | {ARCHIVE_DIGEST} >save.sum; echo saved $?", user="dr-bob")
        pollUntil(lambda: int(m.run("wc -l <echo.out", user="dr-bob", check=False).stdout or 0) > 100,
                  60, "the echo to flow")
        for restart in range(RESTARTS):
            time.sleep(SPACING)  # pacing for systemd's start limit, not a wait for anything
            m.run(f"systemctl restart {SERVICE}")
        assert echo.stdout.readline() == "echoed 0\n"
        assert save.stdout.readline() == "saved 0\n"
        assert m.run("cat echo.out", user="dr-bob").stdout.split() == [str(i) for i in range(ECHO_LINES)]
        assert m.run("cat save.sum", user="dr-bob").stdout == direct

        # The event stream and the log stream still run.
        m.run(f"docker run --rm {IMAGE} true", user="dr-alice")
        assert '"die"' in events.stdout.readline()
        seen = int(m.run("docker logs counter | tail -n 1", user="dr-alice").stdout)
        pollUntil(lambda: int(m.run("docker logs counter | tail -n 1", user="dr-alice").stdout) > seen + 10,
                  10, "the counter to go on")
    finally:
        m.run("touch /tmp/stop-ps; docker rm -f counter >/dev/null", user="dr-alice", check=False)
        m.kill(events)
        m.kill(logs)
    assert psLoop.stdout.readline() == "stopped\n"
    counted = [int(line) for line in lines(logs) if line.strip().isdigit()]
    assert counted == list(range(len(counted))) and len(counted) > 1000, counted[-20:]
    times = m.run("cat ps-times; cat ps-errors 2>/dev/null", user="dr-dave").stdout.split()
    assert "fail" not in times, times
    assert max(map(int, times)) <= WAIT_LIMIT_MS, sorted(map(int, times))[-10:]
    journal = m.run(f"journalctl -u {SERVICE} --no-pager -o cat | grep -c 'handed [1-9]'", check=False).stdout
    assert int(journal or 0) >= RESTARTS
