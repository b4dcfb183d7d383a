"""
The measured scenarios.  Each takes a started relay and returns one run's
metrics; relay-side figures (CPU, memory) are None for direct, which has no
relay process.
"""

from __future__ import annotations

import fcntl
import os
import re
import selectors
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.harness import (
    Backend,
    BenchError,
    RunningRelay,
    Settings,
    cpuPinning,
    peakRss,
    resetPeakRss,
    smapsRollup,
    tree,
    treeCpuSeconds,
    treeRssBytes,
)

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Sizes:
    bulkBytes: int
    latencyRequests: int
    connCycles: int
    concurrentConns: int
    slowBytes: int
    slowRate: float  # bytes per second
    slowSeconds: float
    repeat: int
    stalledConns: int = 1024


FULL = Sizes(2 * GiB, 20000, 5000, 9900, 1 * GiB, 20e6, 5.0, 5)
QUICK = Sizes(256 * MiB, 2000, 500, 1000, 1 * GiB, 20e6, 2.0, 2)


@dataclass
class Context:
    loadgen: Path
    settings: Settings
    backend: Backend
    sizes: Sizes


@dataclass
class Metric:
    key: str
    label: str
    fmt: str
    better: Optional[str] = None  # "high", "low" or None (a count, not a figure of merit)
    vsProxyd: bool = False  # print a "÷ proxyd" ratio column


@dataclass
class Scenario:
    name: str
    title: Callable[[Sizes], str]
    metrics: list[Metric]
    run: Callable[[Context, RunningRelay], dict]
    # the metric that the direct-vs-relay self-check compares, if any
    speedKey: Optional[str] = None
    # Where the processes run when pinning: "split" puts the relay on a CPU of
    # its own; "shared" puts backend, relay and load generator on one CPU, so
    # that a request costs no cross-CPU wake-ups and latency is the sum of
    # the parties' work.
    placement: str = "split"


def client(ctx: Context, *args, timeout: float = 900, check: bool = True) -> dict[str, float]:
    """
    Run the C load generator once and parse its C{key=value} line.
    """
    proc = subprocess.run(
        [str(ctx.loadgen), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cpuPinning(ctx.settings.loadCpus),
    )
    if check and proc.returncode != 0:
        raise BenchError(
            f"loadgen {args[0]} exited {proc.returncode}: {proc.stdout.strip()} {proc.stderr.strip()}"
        )
    return parseKv(proc.stdout)


def parseKv(line: str) -> dict[str, float]:
    out = {}
    for word in line.split():
        key, eq, value = word.partition("=")
        if eq:
            out[key] = float(value)
    return out


def relayCpu(relay: RunningRelay) -> Optional[float]:
    return treeCpuSeconds(relay.pid) if relay.pid is not None else None


def cpuDelta(relay: RunningRelay, before: Optional[float]) -> Optional[float]:
    if before is None:
        return None
    relay.settle()
    return treeCpuSeconds(relay.pid) - before


def checkAlive(relay: RunningRelay) -> None:
    if not relay.alive():
        raise BenchError(f"{relay.name} died during the run")


# ------------------------------------------------------------------- bulk


def _bulk(mode: str) -> Callable[[Context, RunningRelay], dict]:
    def run(ctx: Context, relay: RunningRelay) -> dict:
        size = ctx.sizes.bulkBytes
        cpu0 = relayCpu(relay)
        backend0 = treeCpuSeconds(ctx.backend.proc.pid)
        r = client(ctx, mode, relay.path, size)
        cpu = cpuDelta(relay, cpu0)
        backendCpu = treeCpuSeconds(ctx.backend.proc.pid) - backend0
        checkAlive(relay)
        if r.get("bytes") != size or r.get("ok", 1) != 1:
            raise BenchError(f"{mode}: moved {r.get('bytes')} of {size} bytes")
        seconds = r["elapsed_ns"] / 1e9
        return {
            "mbps": size / seconds / 1e6,
            "cpuPerGiB": None if cpu is None else cpu / (size / GiB),
            # How busy the two ends were: near 100% of their CPU, they (not
            # the relay) set the pace.
            "endsBusy": 100 * (r["cpu_ns"] / 1e9 + backendCpu) / seconds,
        }

    return run


BULK_METRICS = [
    Metric("mbps", "MB/s", "{:.0f}", "high", True),
    Metric("cpuPerGiB", "relay CPU s/GiB", "{:.3f}", "low", True),
    Metric("endsBusy", "ends' CPU %", "{:.0f}"),
]


# ---------------------------------------------------------------- latency


def runLatency(ctx: Context, relay: RunningRelay) -> dict:
    n = ctx.sizes.latencyRequests
    cpu0 = relayCpu(relay)
    r = client(ctx, "latency", relay.path, n)
    cpu = cpuDelta(relay, cpu0)
    checkAlive(relay)
    return {
        "p50": r["p50_ns"] / 1e3,
        "p99": r["p99_ns"] / 1e3,
        "cpuPerReq": None if cpu is None else cpu / n * 1e6,
    }


# ---------------------------------------------------------- connection rate


def _connrate(workers: int) -> Callable[[Context, RunningRelay], dict]:
    def run(ctx: Context, relay: RunningRelay) -> dict:
        n = ctx.sizes.connCycles
        cpu0 = relayCpu(relay)
        r = client(ctx, "connrate", relay.path, n, workers, check=False)
        cpu = cpuDelta(relay, cpu0)
        checkAlive(relay)
        if "ok" not in r:
            raise BenchError("connrate printed no result")
        return {
            "connps": r["ok"] / (r["elapsed_ns"] / 1e9),
            "failed": r["failed"],
            "retried": r["retried"],
            "cpuPerConn": None if cpu is None else cpu / n * 1e6,
        }

    return run


# ------------------------------------------------------------ concurrency


def _readLine(proc: subprocess.Popen, mode: str, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"no answer from loadgen {mode} within {timeout}s")
        return proc.stdout.readline()
    finally:
        sel.close()


def _whileHeld(
    ctx: Context, relay: RunningRelay, mode: str, n: int, measure: Callable[[], Any], timeout: float
) -> tuple[dict[str, float], Any]:
    """
    Run a loadgen mode that opens C{n} connections, says READY and holds
    them (C{hold}, C{stall}); C{measure} while they are held, then let them
    go.  Returns the READY line's figures and what C{measure} returned.
    """
    proc = subprocess.Popen(
        [str(ctx.loadgen), mode, relay.path, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=cpuPinning(ctx.settings.loadCpus),
    )
    try:
        line = _readLine(proc, mode, timeout)
        measured = measure() if line.startswith("READY") else None
        alive = relay.alive()
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not line.startswith("READY"):
        raise BenchError(f"loadgen {mode}: {line!r}")
    if not alive:
        raise BenchError(f"{relay.name} died while holding connections")
    return parseKv(line), measured


def runConcurrency(ctx: Context, relay: RunningRelay) -> dict:
    n = ctx.sizes.concurrentConns
    base = smapsRollup(relay.pid) if relay.pid else None
    r, held = _whileHeld(
        ctx, relay, "hold", n, lambda: smapsRollup(relay.pid) if relay.pid else None, 400
    )
    answered = r["answered"]
    out = {
        "answered": answered,
        "failed": r["failed"],
        "openSeconds": r["elapsed_ns"] / 1e9,
        "retries": r["retries"],
        "rssPerConn": None,
        "pssPerConn": None,
    }
    if base is not None and answered:
        out["rssPerConn"] = (held["Rss"] - base["Rss"]) / answered / 1024
        out["pssPerConn"] = (held["Pss"] - base["Pss"]) / answered / 1024
    return out


# ------------------------------------------------------------ slow reader


def runSlow(ctx: Context, relay: RunningRelay) -> dict:
    s = ctx.sizes
    pid = relay.pid
    base = treeRssBytes(pid) if pid else 0
    hwm = resetPeakRss(pid) if pid else False
    peak = base
    proc = subprocess.Popen(
        [str(ctx.loadgen), "slow", relay.path, str(s.slowBytes), str(s.slowRate), str(s.slowSeconds)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=cpuPinning(ctx.settings.loadCpus),
    )
    deadline = time.monotonic() + s.slowSeconds + 60
    try:
        # Sample the relay's resident set while the reader crawls: a relay
        # that buffers grows steadily, so 5 ms sampling sees its peak.
        while proc.poll() is None and time.monotonic() < deadline:
            if pid:
                peak = max(peak, treeRssBytes(pid))
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"loadgen slow exited {proc.returncode}")
    if pid and hwm:
        peak = max(peak, peakRss(pid))
    checkAlive(relay)
    r = parseKv(out)
    return {
        "peakGrowth": (peak - base) / MiB if pid else None,
        "readMBps": r["bytes"] / (r["elapsed_ns"] / 1e9) / 1e6,
    }


# ---------------------------------------------------------------- stalled


def memAvailable() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("no MemAvailable in /proc/meminfo")


def inFlight(pid: int) -> tuple[int, int]:
    """
    What C{pid} and its descendants hold in flight: the bytes queued on
    their sockets that the peers have not read (C{ss}'s skmem C{t}, the
    kernel's count, overhead included) plus the bytes in their pipes; and
    how many pipes they have.
    """
    pids = tree(pid)
    ss = subprocess.run(["ss", "-x", "-m", "-p", "-H"], capture_output=True, text=True).stdout
    held = 0
    for line in ss.splitlines():
        if any(f"pid={p}," in line for p in pids):
            held += sum(int(t) for t in re.findall(r"skmem:\(\S*?\bt(\d+)", line))
    pipes = set()
    for p in pids:
        try:
            names = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for name in names:
            path = f"/proc/{p}/fd/{name}"
            try:
                target = os.readlink(path)
                if not target.startswith("pipe:") or target in pipes:
                    continue
                pipes.add(target)
                # Opened through /proc: the same pipe, read by no one here.
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                held += struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
            finally:
                os.close(fd)
    return held, len(pipes)


def _settled(relay: RunningRelay, timeout: float) -> None:
    """
    Wait until the stalled streams have filled everything they can: the
    relay spends no CPU and MemAvailable holds still, for a whole second.
    """
    deadline = time.monotonic() + timeout
    last = (relayCpu(relay) or 0.0, memAvailable())
    still = 0
    while still < 4:
        if time.monotonic() > deadline:
            raise BenchError(f"still moving after {timeout}s")
        time.sleep(0.25)
        now = (relayCpu(relay) or 0.0, memAvailable())
        quiet = now[0] - last[0] < 0.002 and abs(now[1] - last[1]) < 2 * MiB
        still = still + 1 if quiet else 0
        last = now


def runStalled(ctx: Context, relay: RunningRelay) -> dict:
    before = memAvailable()

    def measure() -> tuple[int, Optional[tuple[int, int]]]:
        _settled(relay, 120)
        return before - memAvailable(), inFlight(relay.pid) if relay.pid else None

    r, (pinned, held) = _whileHeld(ctx, relay, "stall", ctx.sizes.stalledConns, measure, 120)
    opened = r["opened"]
    return {
        "opened": opened,
        "pinned": pinned / MiB,
        "perConn": pinned / opened / 1024 if opened else None,
        "held": held[0] / MiB if held else None,
        "pipes": held[1] if held else None,
    }


# ------------------------------------------------------------------ table

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "bulk-down",
            lambda z: f"bulk download: {z.bulkBytes / GiB:g} GiB over one connection",
            BULK_METRICS,
            _bulk("down"),
            "mbps",
        ),
        Scenario(
            "bulk-up",
            lambda z: f"bulk upload: {z.bulkBytes / GiB:g} GiB over one connection",
            BULK_METRICS,
            _bulk("up"),
            "mbps",
        ),
        *[
            Scenario(
                name,
                lambda z, where=where: (
                    f"request latency: {z.latencyRequests} sequential tiny requests, one keep-alive "
                    f"connection, {where}"
                ),
                [
                    Metric("p50", "p50 µs", "{:.1f}", "low", True),
                    Metric("p99", "p99 µs", "{:.1f}", "low"),
                    Metric("cpuPerReq", "relay CPU µs/req", "{:.1f}", "low", True),
                ],
                runLatency,
                "p50",
                placement,
            )
            for name, where, placement in [
                ("latency", "relay on its own CPU", "split"),
                ("latency-1cpu", "everything on one CPU", "shared"),
            ]
        ],
        *[
            Scenario(
                f"connrate-{w}",
                lambda z, w=w: f"connection rate: {z.connCycles} connect-request-close cycles, {w} worker{'s' if w > 1 else ''}",
                [
                    Metric("connps", "conn/s", "{:.0f}", "high", True),
                    Metric("failed", "failed", "{:.0f}"),
                    Metric("retried", "EAGAIN-retried", "{:.0f}"),
                    Metric("cpuPerConn", "relay CPU µs/conn", "{:.0f}", "low", True),
                ],
                _connrate(w),
                "connps",
            )
            for w in (1, 32)
        ],
        Scenario(
            "concurrency",
            lambda z: f"concurrency: {z.concurrentConns} connections held, one request each",
            [
                Metric("answered", "answered", "{:.0f}"),
                Metric("failed", "failed", "{:.0f}"),
                Metric("rssPerConn", "RSS KiB/conn", "{:.2f}", "low", True),
                Metric("pssPerConn", "PSS KiB/conn", "{:.2f}", "low", True),
                Metric("openSeconds", "open+answer s", "{:.2f}", "low"),
                Metric("retries", "EAGAIN", "{:.0f}"),
            ],
            runConcurrency,
            "openSeconds",
        ),
        Scenario(
            "slow",
            lambda z: f"slow reader: {z.slowBytes / GiB:g} GiB stream read at {z.slowRate / 1e6:g} MB/s for {z.slowSeconds:g} s",
            [
                Metric("peakGrowth", "relay peak RSS growth MiB", "{:.2f}", "low", True),
                Metric("readMBps", "read MB/s", "{:.1f}"),
            ],
            runSlow,
        ),
        Scenario(
            "stalled",
            lambda z: (
                f"stalled readers: {z.stalledConns} connections of one user, each an endless "
                f"download never read (MemAvailable before - after, the whole host's and so noisy; "
                f"the relay's own: its sockets' unread queues and its pipes)"
            ),
            [
                Metric("opened", "connections", "{:.0f}"),
                Metric("pinned", "MemAvailable fall MiB", "{:.0f}", "low"),
                Metric("perConn", "KiB/conn", "{:.0f}", "low"),
                Metric("held", "relay's in flight MiB", "{:.1f}", "low"),
                Metric("pipes", "pipes held", "{:.0f}"),
            ],
            runStalled,
        ),
    ]
}

GROUPS = {
    "bulk": ["bulk-down", "bulk-up"],
    "latency": ["latency", "latency-1cpu"],
    "connrate": ["connrate-1", "connrate-32"],
    "concurrency": ["concurrency"],
    "slow": ["slow"],
    "stalled": ["stalled"],
}
