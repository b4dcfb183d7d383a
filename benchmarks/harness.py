"""
Processes for the benchmarks: the C backend and load generator, the relays
under test, and what /proc says about them.

Every process is started in its own session so that it (and, for socat, its
forked children) can be stopped by its process group, and every one is
stopped before the run ends.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
LOADGEN_SOURCE = HERE / "loadgen.c"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

PROXYD = "/lib/systemd/systemd-socket-proxyd"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"


class BenchError(Exception):
    """
    A run could not be measured (a process died, a client reported failure).
    """


def waitFor(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.005) -> None:
    """
    Poll C{predicate} until it is true, or raise L{BenchError} after
    C{timeout} seconds: readiness is observed, never assumed after a sleep.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def buildLoadgen(workdir: Path) -> Path:
    """
    Compile loadgen.c with gcc into C{workdir}; it is a few hundred lines and
    takes well under a second, so nothing is cached between runs.
    """
    digest = hashlib.sha256(LOADGEN_SOURCE.read_bytes()).hexdigest()[:12]
    out = workdir / f"loadgen-{digest}"
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BenchError("gcc is needed to build benchmarks/loadgen.c")
    subprocess.run(
        [gcc, "-O2", "-Wall", "-pthread", "-o", str(out), str(LOADGEN_SOURCE)],
        check=True,
    )
    return out


# --------------------------------------------------------------------- /proc


def children(pid: int) -> list[int]:
    """
    Direct children of C{pid} (all its threads), zombies included.
    """
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    found.extend(int(c) for c in f.read().split())
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """
    C{pid} and all its descendants (socat forks one child per connection).
    """
    out = [pid]
    i = 0
    while i < len(out) and len(out) < 100000:
        out.extend(children(out[i]))
        i += 1
    return out


def _statFields(pid: int) -> Optional[list[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def _threadsOnCpuNs(pid: int) -> Optional[int]:
    """
    Nanoseconds on CPU of the live threads of C{pid}, from schedstat: far
    finer than the 10 ms ticks of utime/stime in /proc/PID/stat.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total


def treeCpuSeconds(pid: int) -> float:
    """
    CPU time (user+sys) of C{pid} and its live descendants, plus their
    reaped children.

    Live threads are read from schedstat (nanoseconds); reaped children only
    exist as cutime/cstime in /proc/PID/stat (ticks).  A child's time moves
    into its parent's cutime/cstime when it is reaped, at the moment it leaves
    the children list, so nothing is counted twice.
    """
    total = 0.0
    for p in tree(pid):
        f = _statFields(p)
        if f is None:
            continue
        # fields 14-17 of stat(5): utime stime cutime cstime; f[0] is field 3
        utime, stime, cutime, cstime = (int(x) for x in f[11:15])
        ns = _threadsOnCpuNs(p)
        own = (utime + stime) / CLK_TCK if ns is None else ns / 1e9
        total += own + (cutime + cstime) / CLK_TCK
    return total


def treeRssBytes(pid: int) -> int:
    """
    Resident set of C{pid} and its descendants, from statm: cheap enough to
    sample every few milliseconds.
    """
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


def smapsRollup(pid: int) -> dict[str, int]:
    """
    Rss and Pss (bytes) of C{pid} and its descendants from smaps_rollup.
    """
    out = {"Rss": 0, "Pss": 0}
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in out:
                        out[key] += int(rest.split()[0]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def resetPeakRss(pid: int) -> bool:
    """
    Reset VmHWM (clear_refs 5) so that L{peakRss} reports the peak from now.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peakRss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------- processes


def cpuPinning(cpus: Optional[set[int]]) -> Optional[Callable[[], None]]:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def stopProcess(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """
    SIGTERM the process group that C{proc} leads, then SIGKILL it if it has
    not exited within C{timeout} seconds.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while forked children (socat) still run.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout)


def canConnect(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def ping(path: str, count: int = 3) -> None:
    """
    Make C{count} tiny requests through C{path} (a warm-up, and proof that the
    whole chain works before anything is measured).
    """
    for _ in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(b"Q%015d" % 0)
            got = b""
            while len(got) < 16:
                chunk = s.recv(16 - len(got))
                if not chunk:
                    break
                got += chunk
            if not got.startswith(b"R"):
                raise BenchError(f"warm-up request through {path} got {got!r}")


class Backend:
    """
    The C backend server, listening where the router's template points for
    uid 0 (the benchmark runs as root, so client and backend are both uid 0).
    """

    def __init__(self, loadgen: Path, workdir: Path, cpus: Optional[set[int]]) -> None:
        self.template = str(workdir / "run" / "{uid}" / "docker.sock")
        self.path = self.template.format(uid=os.getuid())
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(loadgen), "server", self.path],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=cpuPinning(cpus),
        )
        waitFor(lambda: self.proc.poll() is not None or canConnect(self.path), 10, "the backend")
        self.check()

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"backend server exited with {self.proc.returncode}")

    def stop(self) -> None:
        stopProcess(self.proc)


# ------------------------------------------------------------------ relays

PORTFORWARD_RELAY = r'''
"""A naive Unix-socket relay built on twisted.protocols.portforward."""
import sys
from twisted.internet import reactor
from twisted.protocols import portforward

class Server(portforward.ProxyServer):
    noisy = False
    def connectionMade(self):
        # As ProxyServer.connectionMade, but to a Unix socket.
        self.transport.pauseProducing()
        client = self.clientProtocolFactory()
        client.noisy = False
        client.setServer(self)
        reactor.connectUNIX(self.factory.backend, client)

class Factory(portforward.ProxyFactory):
    protocol = Server
    noisy = False
    def __init__(self, backend):
        self.backend = backend

reactor.listenUNIX(sys.argv[1], Factory(sys.argv[2]), mode=0o666)
reactor.run()
'''


# How late the router writes a connection's record at most (it batches
# them: dockerrouter.base.logging.ConnectionRecords.interval), with a margin.
RECORDS_LATE = 0.2


@dataclass
class RunningRelay:
    """
    A relay listening on C{path}; C{pid} is the process whose CPU and memory
    are measured (None for direct, where there is no relay).
    """

    name: str
    path: str
    proc: Optional[subprocess.Popen] = None
    log: Optional[Path] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def settle(self, timeout: float = 10.0) -> None:
        """
        Wait until the relay has done what it owes for the run: no forked
        children left (socat), so that their CPU has been reaped into the
        parent's cutime/cstime, and the router's last batch of connection
        records written (see L{RECORDS_LATE}).
        """
        if self.proc is not None:
            pid = self.proc.pid
            waitFor(lambda: not children(pid), timeout, f"{self.name} children to exit", 0.002)
            time.sleep(RECORDS_LATE)

    def stop(self) -> None:
        if self.proc is not None:
            stopProcess(self.proc)


@dataclass
class RelayKind:
    name: str
    describe: str
    command: Callable[["Settings", str, "Backend"], list[str]]
    available: Callable[["Settings"], Optional[str]] = lambda s: None
    skip: dict[str, str] = field(default_factory=dict)  # scenario -> reason
    remarks: dict[str, str] = field(default_factory=dict)  # scenario -> footnote


@dataclass
class Settings:
    twistd: str
    python: str
    workdir: Path
    relayCpus: Optional[set[int]]
    loadCpus: Optional[set[int]]
    routerArgs: list[str] = field(default_factory=list)  # extra options for the router


def _routerCommand(s: Settings, path: str, b: "Backend", *extra: str) -> list[str]:
    return [
        # "-": into the run's log file; twistd rotates a named log file at
        # 1 MB, which for /dev/null would rename the device away.
        s.twistd, "-n", "--pidfile=", "--logfile=-", "docker-router",
        "--listen", f"unix:{path}:mode=666:lockfile=1", "--user-socket", b.template,
        *extra, *s.routerArgs,
    ]


def _which(path: str) -> Optional[str]:
    return None if os.access(path, os.X_OK) else f"{path} not found"


RELAYS: dict[str, RelayKind] = {
    "direct": RelayKind(
        "direct",
        "no relay: the client connects to the backend socket (the limit)",
        lambda s, path, b: [],
    ),
    "proxyd": RelayKind(
        "proxyd",
        "systemd-socket-proxyd under systemd-socket-activate (C, splice)",
        lambda s, path, b: [
            SOCKET_ACTIVATE, "-l", path, PROXYD, "--connections-max=20000", b.path,
        ],
        lambda s: _which(PROXYD) or _which(SOCKET_ACTIVATE),
        {},
        {"concurrency": "systemd-socket-proxyd uses 6 descriptors per connection (2 sockets, 2 pipes)"},
    ),
    "socat": RelayKind(
        "socat",
        "socat UNIX-LISTEN:...,fork (one process per connection, default backlog 5)",
        lambda s, path, b: ["socat", f"UNIX-LISTEN:{path},fork,mode=666", f"UNIX-CONNECT:{b.path}"],
        lambda s: None if shutil.which("socat") else "socat not installed (apt-get install socat)",
        {"concurrency": "forks one process per connection"},
        {
            "slow": "socat's slow-reader growth is mostly the process it forks for the connection",
            "connrate": "socat's default listen backlog is 5, hence the EAGAIN retries",
        },
    ),
    "portforward": RelayKind(
        "portforward",
        "naive Twisted relay on twisted.protocols.portforward",
        lambda s, path, b: [s.python, "-c", PORTFORWARD_RELAY, path, b.path],
    ),
    "router": RelayKind(
        "router",
        "docker-router under twistd",
        lambda s, path, b: _routerCommand(s, path, b),
        lambda s: _which(s.twistd),
    ),
    "router-metrics": RelayKind(
        "router-metrics",
        "docker-router under twistd, serving metrics (the cost of metrics: compare with router)",
        lambda s, path, b: _routerCommand(s, path, b, "--metrics", f"unix:{path}.metrics:mode=600"),
        lambda s: _which(s.twistd),
    ),
}


_counter = 0


def startRelay(kind: RelayKind, settings: Settings, backend: Backend) -> RunningRelay:
    """
    Start a fresh relay (each measured run gets its own, so that memory
    figures do not inherit a previous run's heap), wait until it accepts and
    relays a request.
    """
    global _counter
    if kind.name == "direct":
        ping(backend.path)
        return RunningRelay("direct", backend.path)
    _counter += 1
    path = str(settings.workdir / f"{kind.name}-{_counter}.sock")
    log = settings.workdir / f"{kind.name}-{_counter}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            kind.command(settings, path, backend),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=cpuPinning(settings.relayCpus),
        )
    relay = RunningRelay(kind.name, path, proc, log)
    try:
        waitFor(lambda: proc.poll() is not None or canConnect(path), 30, f"{kind.name} to listen")
        if proc.poll() is not None:
            raise BenchError(f"{kind.name} exited with {proc.returncode}: {tail(log)}")
        ping(path)
        relay.settle()
    except BaseException:
        relay.stop()
        raise
    return relay


def tail(path: Optional[Path], n: int = 400) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def defaultTwistd() -> str:
    here = Path(sys.executable).parent / "twistd"
    if here.exists():
        return str(here)
    return "/opt/docker-router/venv/bin/twistd"
