"""
The router under a real systemd (issue 8): socket activation across restarts
and stops, readiness, reload, status, watchdog, the journal, a clean install.

One machine for the module, set up as README.md says (router, then
C{docker.io}), with users dr-alice and dr-bob (rootless daemons, through
README's per-user steps) and dr-carol (none). Every test leaves the router as
it found it: C{docker-router.socket} active, the service running or
startable.
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
from conftest import IMAGE, installedMachine, pollUntil

SERVICE = "docker-router.service"
SOCKET = "docker-router.socket"
USERS = ["dr-alice", "dr-bob"]
NO_DAEMON = "dr-carol"
CALLS = 300
RESTARTS = 4


@pytest.fixture(scope="module")
def m(release):
    with installedMachine(release, daemons=USERS, others=[NO_DAEMON]) as machine:
        yield machine


def show(m, unit, *properties):
    """
    C{systemctl show} of some properties, as a dict.
    """
    out = m.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def ping(m, user):
    """
    C{docker version} through /var/run/docker.sock as C{user}; the result.
    """
    return m.run("docker version --format '{{.Server.Version}}'", user=user, check=False)


def readLine(process, timeout=15):
    """
    The next line a spawned process prints, or an empty string after
    C{timeout} seconds.
    """
    with ThreadPoolExecutor(1) as pool:
        line = pool.submit(process.stdout.readline)
        try:
            return line.result(timeout)
        except FutureTimeout:
            return ""


def plainUnit(m, listen):
    """
    A copy of the service, C{dr-plain.service}, without socket activation,
    listening on C{listen}.
    """
    m.run("sed -e '/^ExecStart=/{s| --listen [^ ]*||g;s|$| --listen " + listen + "|}' "
          "/etc/systemd/system/docker-router.service >/etc/systemd/system/dr-plain.service "
          "&& systemctl daemon-reload")


def removePlainUnit(m):
    m.run("systemctl stop dr-plain.service; rm -f /etc/systemd/system/dr-plain.service "
          "/run/dr-plain.sock; systemctl daemon-reload", check=False)


def mainPid(m):
    return int(show(m, SERVICE, "MainPID")["MainPID"])


def journal(m, *matches):
    """
    The journal entries (as dicts) that match journalctl's C{matches}.
    """
    out = m.run("journalctl --no-pager -o json " + " ".join(matches), check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def newEntries(m, matches, action, what):
    """
    Run C{action}, then wait for journal entries matching C{matches} that
    were not there before it; return them.
    """
    before = len(journal(m, *matches))
    action()
    return pollUntil(lambda: journal(m, *matches)[before:], 10, what)


@pytest.fixture(autouse=True)
def running(m):
    """
    Each test starts with the socket active and the service running.
    """
    m.run(f"systemctl reset-failed {SERVICE}; systemctl start {SOCKET} {SERVICE}")
    yield


def test_restartUnderLoad(m):
    """
    Two users run C{docker ps} in a loop (300 calls in all) while the
    router is restarted four times: not one call fails.
    """
    each = CALLS // len(USERS)
    loop = (f"rm -f progress; fails=0; for i in $(seq {each}); do "
            "docker ps -q >/dev/null 2>>ps-errors || fails=$((fails + 1)); echo >>progress; done; "
            "echo fails=$fails")
    loops = [m.spawn(loop, user=name) for name in USERS]

    def calls():
        return min(int(m.run("cat progress 2>/dev/null | wc -l", user=name).stdout) for name in USERS)

    # Spread over the run (systemd refuses a sixth start within ten seconds).
    for restart in range(1, RESTARTS + 1):
        target = restart * each // (RESTARTS + 1)
        pollUntil(lambda: calls() >= target, 120, f"{target} calls each")
        m.run(f"systemctl restart {SERVICE}")
    outputs = [readLine(p, 120) for p in loops]
    errors = {name: m.run("cat ps-errors 2>/dev/null; rm -f ps-errors progress", user=name).stdout
              for name in USERS}
    assert outputs == ["fails=0\n"] * len(USERS), (outputs, errors)
    assert show(m, SOCKET, "ActiveState")["ActiveState"] == "active"


def test_stopLeavesSocket(m):
    """
    C{systemctl stop docker-router} leaves the socket unit active and the
    path accepting; the next connection starts the service again.
    """
    m.run(f"systemctl stop {SERVICE}")
    assert show(m, SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert show(m, SOCKET, "ActiveState")["ActiveState"] == "active"
    result = ping(m, "dr-alice")
    assert result.returncode == 0, result.stderr
    assert show(m, SERVICE, "ActiveState")["ActiveState"] == "active"
    errors = m.run(f"journalctl -u {SOCKET} --no-pager -o cat | grep -i -e POLLHUP -e failed",
                   check=False).stdout
    assert errors == ""


def listeners(m):
    """
    C{ss -xl}: the listening Unix sockets, as (path, backlog).
    """
    found = {}
    for fields in (line.split() for line in m.run("ss -xlnH").stdout.splitlines()):
        paths = [i for i, f in enumerate(fields) if f.startswith("/")]
        if paths:
            found[fields[paths[0]]] = int(fields[paths[0] - 1])
    return found


def test_backlog(m):
    """
    The listening socket keeps its backlog of 4096 after the router took it
    over, and after a restart.
    """
    for step in ("start", "restart"):
        m.run(f"systemctl {step} {SERVICE}")
        found = listeners(m)
        path = "/run/docker.sock" if "/run/docker.sock" in found else "/var/run/docker.sock"
        assert found.get(path) == 4096, (step, found)


def test_startReturnsWhenReady(m):
    """
    Without socket activation (the plain unit on a path of its own),
    C{systemctl start} returns only once the router accepts: the very next
    connect works.
    """
    plainUnit(m, "unix:/run/dr-plain.sock:mode=666:lockfile=1")
    try:
        assert show(m, "dr-plain.service", "Type")["Type"] == "notify"
        for attempt in range(3):
            result = m.run("systemctl start dr-plain.service && runuser -u dr-alice -- "
                           "curl -sS --unix-socket /run/dr-plain.sock http://docker/_ping", check=False)
            assert (result.returncode, result.stdout) == (0, "OK"), (attempt, result)
            m.run("systemctl stop dr-plain.service")
    finally:
        removePlainUnit(m)


def test_stopRemovesOnlyItsOwnSocket(m):
    """
    A plain router whose path someone else has bound meanwhile leaves that
    socket alone when it stops.
    """
    plainUnit(m, "unix:/run/dr-plain.sock:mode=666")
    m.run("systemctl start dr-plain.service")
    other = m.spawn("rm /run/dr-plain.sock && exec python3 -c \"import socket, time; "
                    "s = socket.socket(socket.AF_UNIX); s.bind('/run/dr-plain.sock'); s.listen(); "
                    "print('bound', flush=True); time.sleep(600)\"")
    try:
        assert readLine(other) == "bound\n"
        inode = m.run("stat -c %i /run/dr-plain.sock").stdout
        m.run("systemctl stop dr-plain.service")
        assert m.run("stat -c %i /run/dr-plain.sock", check=False).stdout == inode
    finally:
        m.kill(other)
        removePlainUnit(m)


def test_reloadKeepsLiveRelay(m):
    """
    C{systemctl reload} and a plain SIGHUP keep the process and a live
    relay: an event stream opened before them sees a container that runs
    after; the router logs the reload.
    """
    pid = mainPid(m)
    events = m.spawn("exec curl -sN --unix-socket /var/run/docker.sock "
                     "'http://docker/events?filters=%7B%22event%22%3A%5B%22die%22%5D%7D'", user="dr-alice")
    try:
        # The stream is live once it has shown one container's end (the first run may come
        # before the daemon has the subscriber).
        pollUntil(lambda: m.run(f"docker run --rm {IMAGE} true", user="dr-alice")
                  and '"die"' in readLine(events, 5), 30, "an event through the stream")
        reloads = [f"_PID={pid}", "--grep=reload"]
        before = len(journal(m, *reloads))
        m.run(f"systemctl reload {SERVICE}")
        m.run(f"kill -HUP {pid}")
        assert mainPid(m) == pid
        assert show(m, SERVICE, "ActiveState")["ActiveState"] == "active"
        m.run(f"docker run --rm {IMAGE} true", user="dr-alice")
        assert '"die"' in readLine(events)
    finally:
        m.kill(events)
    assert len(journal(m, *reloads)) - before == 2, journal(m, *reloads)


def test_status(m):
    """
    C{systemctl status} shows the router's STATUS= line, with live
    connections and users.
    """
    events = m.spawn("exec curl -sN --unix-socket /var/run/docker.sock http://docker/events", user="dr-bob")
    try:
        status = pollUntil(lambda: (lambda text: "connection" in text and "user" in text
                                    and re.search(r"[1-9]", text) and text)(
                                        show(m, SERVICE, "StatusText")["StatusText"]),
                           15, "STATUS= with a live connection")
        assert status in m.run(f"systemctl status --no-pager {SERVICE}", check=False).stdout
    finally:
        m.kill(events)


def test_watchdog(m):
    """
    The unit has a watchdog, the router keeps feeding it, and a router that
    stops answering (SIGSTOP) is killed and started again.
    """
    assert show(m, SERVICE, "WatchdogUSec")["WatchdogUSec"] not in ("", "0", "infinity")
    dropin = "/run/systemd/system/docker-router.service.d"
    m.run(f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=2\\n' >{dropin}/watchdog.conf "
          f"&& systemctl daemon-reload && systemctl restart {SERVICE}")
    try:
        started = time.monotonic()
        pid = mainPid(m)
        # Alive for three watchdog periods: it pings.
        pollUntil(lambda: time.monotonic() - started > 6, 10, "three watchdog periods")
        assert mainPid(m) == pid and show(m, SERVICE, "NRestarts")["NRestarts"] == "0"
        m.run(f"kill -STOP {pid}")
        pollUntil(lambda: mainPid(m) not in (0, pid), 20, "a restart by the watchdog")
        assert ping(m, "dr-alice").returncode == 0
    finally:
        m.run(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart {SERVICE}")


def test_journalFields(m):
    """
    Each connection is one journal entry with queryable fields, identifier
    docker-router and the router's pid; a rejection carries its cause; no
    line of the router has twistd's C{[-]} prefix.
    """
    pid = mainPid(m)
    done = newEntries(m, ["DOCKER_ROUTER_USER=dr-alice", f"_PID={pid}"],
                      lambda: ping(m, "dr-alice").check_returncode(), "an entry with DOCKER_ROUTER_USER=dr-alice")
    uid = m.uids["dr-alice"]
    entry = done[-1]
    assert entry["DOCKER_ROUTER_UID"] == str(uid)
    assert entry["DOCKER_ROUTER_BACKEND"] == f"/run/user/{uid}/docker.sock"
    for field in ("PID", "BYTES_TO_DOCKER", "BYTES_FROM_DOCKER", "DURATION", "END"):
        assert entry.get(f"DOCKER_ROUTER_{field}"), (field, entry)
    assert int(entry["DOCKER_ROUTER_BYTES_FROM_DOCKER"]) > 0
    assert entry["SYSLOG_IDENTIFIER"] == "docker-router" and entry["_PID"] == str(pid)
    assert entry["PRIORITY"] == "6"
    refusals = []
    rejected = newEntries(m, [f"DOCKER_ROUTER_UID={m.uids[NO_DAEMON]}", f"_PID={pid}"],
                          lambda: refusals.append(ping(m, NO_DAEMON)), "an entry for dr-carol's rejection")
    assert refusals[0].returncode != 0 and "dr-carol" in refusals[0].stderr
    warnings = [e for e in rejected if e.get("DOCKER_ROUTER_CAUSE") == "missing" and e["PRIORITY"] == "4"]
    assert warnings, [{k: v for k, v in e.items() if k.startswith("DOCKER_ROUTER") or k in ("MESSAGE", "PRIORITY")}
                      for e in rejected]
    # The unit's lines but systemd's own (its exec helper logs under the unit, with CODE_FILE=).
    lines = [e for e in journal(m, f"_SYSTEMD_UNIT={SERVICE}") if "CODE_FILE" not in e]
    assert lines and not [e["MESSAGE"] for e in lines if "[-]" in str(e.get("MESSAGE"))]
    assert [(e.get("SYSLOG_IDENTIFIER"), e["MESSAGE"]) for e in lines
            if e.get("SYSLOG_IDENTIFIER") != "docker-router"] == []


def test_cleanInstall(m):
    """
    No plugin-cache warning in the service's journal, no writable /run
    beyond the router's own directory, and
    C{systemd-analyze verify} finds nothing to say about the units
    (C{Documentation=} included: it checks that the man page exists).
    """
    m.run(f"systemctl restart {SERVICE}")
    # After a relayed connection, the router has logged its start.
    assert ping(m, "dr-alice").returncode == 0
    out = m.run(f"journalctl _PID={mainPid(m)} --no-pager -o cat").stdout
    assert "starting" in out and "plugin cache" not in out, out
    # Socket-activated, the service writes nowhere in /run but its own directory.
    assert show(m, SERVICE, "ReadWritePaths")["ReadWritePaths"] == ""
    assert show(m, SERVICE, "RuntimeDirectory")["RuntimeDirectory"] == "docker-router"
    verify = m.run("systemd-analyze verify /etc/systemd/system/docker-router.service "
                   "/etc/systemd/system/docker-router.socket", check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_adviceNamesRealCommands(m):
    """
    A user without a daemon is told how to set one up, with the setup tool
    where Debian put it: the command the router names works here (run with
    the tool's C{check} instead of C{install}, to leave the user as is).
    """
    refused = ping(m, NO_DAEMON)
    assert refused.returncode != 0
    advice = re.search(r"`([^`]*dockerd-rootless-setuptool\.sh install[^`]*)`", refused.stderr)
    assert advice, refused.stderr
    check = m.login(NO_DAEMON, re.sub(r"\binstall\b", "check", advice.group(1)))
    assert check.returncode == 0, (advice.group(1), check.stdout, check.stderr)
