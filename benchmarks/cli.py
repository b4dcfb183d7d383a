"""
Command line: build the load generator, start the backend, run the selected
scenarios against the selected relays (interleaved, repeated, a fresh relay
process for every run), print the tables and clean everything up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks import report
from benchmarks.harness import (
    RELAYS,
    Backend,
    BenchError,
    Settings,
    buildLoadgen,
    defaultTwistd,
    startRelay,
)
from benchmarks.scenarios import FULL, GROUPS, QUICK, SCENARIOS, Context

DEFAULT_RELAYS = ["direct", "proxyd", "socat", "portforward", "router", "router-metrics"]


def parseArgs(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark docker-router against direct, socat, systemd-socket-proxyd "
        "and a naive Twisted portforward relay (issue 4).",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes and 2 repeats (under a minute)")
    p.add_argument(
        "--only",
        default=",".join(GROUPS),
        help="comma-separated scenarios: " + ", ".join(GROUPS) + " or " + ", ".join(SCENARIOS)
        + " (default: all)",
    )
    p.add_argument("--relays", default=",".join(DEFAULT_RELAYS), help="comma-separated, from: "
                   + ", ".join(RELAYS) + " (default: all)")
    p.add_argument("--repeat", type=int, help="runs per relay and scenario (default 5, quick 2)")
    p.add_argument("--bulk-bytes", type=int, help="bytes each way in the bulk scenarios")
    p.add_argument("--requests", type=int, help="requests in the latency scenario")
    p.add_argument("--cycles", type=int, help="connect-request-close cycles in the connrate scenarios")
    p.add_argument("--connections", type=int, help="connections held in the concurrency scenario")
    p.add_argument("--slow-seconds", type=float, help="how long the slow reader reads")
    p.add_argument("--stalled", type=int, help="connections in the stalled scenario (default 1024)")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the relay to the last CPU and the backend and load generator to the others",
    )
    p.add_argument("--twistd", default=defaultTwistd(), help="twistd that has the docker-router plugin")
    p.add_argument("--json", metavar="FILE", help="also write every run's raw figures here")
    return p.parse_args(argv)


def expand(spec: str, known: dict, groups: dict, what: str) -> list[str]:
    out: list[str] = []
    for word in filter(None, (w.strip() for w in spec.split(","))):
        names = groups.get(word, [word] if word in known else None)
        if names is None:
            raise SystemExit(f"unknown {what}: {word}")
        out.extend(n for n in names if n not in out)
    return out


def raiseNofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def probeRouter(settings: Settings, notes: list[str]) -> Optional[str]:
    """
    Check that twistd has a working docker-router plugin (why not, if not),
    and lift the per-user connection cap where the router has one: every
    benchmark client is uid 0, and the cap is policy, not capacity.
    """
    if not os.access(settings.twistd, os.X_OK):
        return f"{settings.twistd} not found"
    proc = subprocess.run(
        [settings.twistd, "docker-router", "--help"], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        return "twistd has no working docker-router plugin: " + (
            proc.stderr.strip().splitlines() or ["?"]
        )[-1]
    if "--max-connections-per-user" in proc.stdout:
        settings.routerArgs += ["--max-connections-per-user", "100000"]
        notes.append(
            "- router run with --max-connections-per-user 100000 (all benchmark clients are uid 0)"
        )
    return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def brief(name: str, run: dict) -> str:
    if "error" in run:
        return "ERROR " + run["error"]
    sc = SCENARIOS[name]
    parts = []
    for m in sc.metrics:
        v = run.get(m.key)
        if v is not None:
            parts.append(f"{m.label}={m.fmt.format(v)}")
    return " ".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    args = parseArgs(argv)
    sizes = dataclasses.replace(QUICK if args.quick else FULL)
    for attr, value in [
        ("repeat", args.repeat),
        ("bulkBytes", args.bulk_bytes),
        ("latencyRequests", args.requests),
        ("connCycles", args.cycles),
        ("concurrentConns", args.connections),
        ("slowSeconds", args.slow_seconds),
        ("stalledConns", args.stalled),
    ]:
        if value is not None:
            setattr(sizes, attr, value)
    scenarios = expand(args.only, SCENARIOS, GROUPS, "scenario")
    relays = expand(args.relays, RELAYS, {}, "relay")
    raiseNofile()
    # A SIGTERM unwinds like Ctrl-C, so the finally clauses stop every relay.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    cpus = sorted(os.sched_getaffinity(0))
    relayCpus = loadCpus = None
    if not args.no_pin and len(cpus) >= 2:
        relayCpus, loadCpus = {cpus[-1]}, set(cpus[:-1])
        # this process samples /proc during runs: keep it off the relay's CPU
        os.sched_setaffinity(0, loadCpus)

    # for the scenarios whose placement is "shared"
    oneCpu = relayCpus or {cpus[-1]}

    workdir = Path(tempfile.mkdtemp(prefix="docker-router-bench-"))
    os.chmod(workdir, 0o755)
    settings = Settings(
        twistd=args.twistd,
        python=sys.executable,
        workdir=workdir,
        relayCpus=relayCpus,
        loadCpus=loadCpus,
    )
    notes: list[str] = []
    unavailable = {}
    routerWhy = probeRouter(settings, notes) if any(r.startswith("router") for r in relays) else None
    for name in relays:
        why = routerWhy if name.startswith("router") else RELAYS[name].available(settings)
        if why:
            unavailable[name] = why
            notes.append(f"- {name} not measured: {why}")
            log(f"{name} not measured: {why}")
    relays = [r for r in relays if r not in unavailable]

    results: report.Results = {}
    backend = None
    loadStart = loadavg()
    started = time.monotonic()
    try:
        loadgen = buildLoadgen(workdir)
        backend = Backend(loadgen, workdir, loadCpus)
        split = Context(loadgen, settings, backend, sizes)
        shared = Context(
            loadgen,
            dataclasses.replace(settings, relayCpus=oneCpu, loadCpus=oneCpu),
            backend,
            sizes,
        )
        for name in scenarios:
            sc = SCENARIOS[name]
            ctx = shared if sc.placement == "shared" else split
            os.sched_setaffinity(backend.proc.pid, ctx.settings.loadCpus or set(cpus))
            byRelay = results.setdefault(name, {})
            active = []
            for relay in relays:
                group = name.split("-")[0]
                remark = RELAYS[relay].remarks.get(group)
                if remark and f"- {remark}" not in notes:
                    notes.append(f"- {remark}")
                why = RELAYS[relay].skip.get(group)
                if why:
                    notes.append(f"- {relay} skipped in {name}: {why}")
                else:
                    active.append(relay)
                    byRelay[relay] = []
            log(f"== {sc.title(sizes)}")
            for rep in range(sizes.repeat):
                # interleaved: every relay once per round, rounds repeated
                for relay in active:
                    backend.check()
                    try:
                        running = startRelay(RELAYS[relay], ctx.settings, backend)
                    except (BenchError, subprocess.SubprocessError, OSError) as e:
                        run = {"error": f"start: {e}"}
                    else:
                        try:
                            run = sc.run(ctx, running)
                        except (BenchError, subprocess.SubprocessError, OSError) as e:
                            run = {"error": str(e)}
                        finally:
                            running.stop()
                    byRelay[relay].append(run)
                    log(f"   {name} {rep + 1}/{sizes.repeat} {relay:12} {brief(name, run)}")
    finally:
        if backend is not None:
            backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - started
    out = [
        f"## docker-router benchmarks ({'quick' if args.quick else 'full'} pass, "
        f"{sizes.repeat} interleaved runs each, {elapsed / 60:.1f} min)",
        "",
        f"Machine: {cpuModel()}, {os.cpu_count()} CPUs, Linux {platform.release()}. "
        + (
            f"Relay pinned to CPU {','.join(map(str, sorted(relayCpus)))}, backend and load generator "
            f"to CPU {','.join(map(str, sorted(loadCpus)))}"
            if relayCpus
            else "No CPU pinning"
        )
        + f" (scenarios marked \"everything on one CPU\": all on CPU {min(oneCpu)}).",
        f"Load average {loadStart} before, {loadavg()} after (other work on the machine adds noise).",
        "Figures are medians (min–max); ratios are of medians. Relay CPU is user+sys of the relay "
        "process tree (/proc/PID/task/*/schedstat, plus reaped children from /proc/PID/stat); "
        "memory is from /proc/PID/smaps_rollup (concurrency) and sampled statm/VmHWM (slow reader). "
        "Each run uses a freshly started relay.",
        "",
    ]
    for name in scenarios:
        if results.get(name):
            out += report.table(name, results[name], sizes) + [""]
    check = report.selfCheck(results)
    if check:
        out += [f"### self-check: direct must beat the router {report.SELF_CHECK_FACTOR:g}x", ""] + check + [""]
    tgt = report.targets(results, sizes)
    if tgt:
        out += ["### router targets (issue 4)", ""] + tgt + [""]
    if notes:
        out += ["### notes", ""] + notes + [""]
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"sizes": dataclasses.asdict(sizes), "results": results}, indent=1)
        )
    failed = any("error" in r for byRelay in results.values() for runs in byRelay.values() for r in runs)
    return 1 if failed else 0


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpuModel() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
