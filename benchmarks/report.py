"""
Plain-text (markdown-friendly) tables of the results: medians with min-max
over the repeated runs, ratios to direct and to systemd-socket-proxyd, the
direct-vs-relay self-check and the router's targets from issue 4.
"""

from __future__ import annotations

import statistics
from typing import Optional

from benchmarks.scenarios import SCENARIOS, Metric, Sizes

Results = dict[str, dict[str, list[dict]]]  # scenario -> relay -> runs

# A direct connection must beat a relay by this factor, or the benchmark is
# measuring its own backend and load generator rather than the relay.
SELF_CHECK_FACTOR = 3.0


def values(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if "error" not in r and r.get(key) is not None]


def median(runs: list[dict], key: str) -> Optional[float]:
    v = values(runs, key)
    return statistics.median(v) if v else None


def cell(runs: list[dict], m: Metric) -> str:
    v = values(runs, m.key)
    if not v:
        return "–"
    med = m.fmt.format(statistics.median(v))
    if len(v) == 1 or min(v) == max(v):
        return med
    return f"{med} ({m.fmt.format(min(v))}–{m.fmt.format(max(v))})"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}x"


def table(name: str, byRelay: dict[str, list[dict]], sizes: Sizes) -> list[str]:
    sc = SCENARIOS[name]
    head = ["relay"]
    for m in sc.metrics:
        head.append(m.label)
        if m.key == sc.speedKey:
            head.append("÷ direct")
        if m.vsProxyd:
            head.append("÷ proxyd")
    head.append("runs")
    lines = [f"### {sc.title(sizes)}", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "|".join("---" for _ in head) + "|")
    proxyd = byRelay.get("proxyd", [])
    direct = byRelay.get("direct", [])
    for relay, runs in byRelay.items():
        row = [relay]
        for m in sc.metrics:
            row.append(cell(runs, m))
            if m.key == sc.speedKey:
                row.append(ratio(median(runs, m.key), median(direct, m.key)))
            if m.vsProxyd:
                row.append(ratio(median(runs, m.key), median(proxyd, m.key)))
        ok = len([r for r in runs if "error" not in r])
        row.append(f"{ok}/{len(runs)}" if ok != len(runs) else str(ok))
        lines.append("| " + " | ".join(row) + " |")
    errors = [(relay, r["error"]) for relay, runs in byRelay.items() for r in runs if "error" in r]
    if errors:
        lines.append("")
        seen = set()
        for relay, err in errors:
            if (relay, err) not in seen:
                seen.add((relay, err))
                lines.append(f"- {relay} failed: {err}")
    return lines


def selfCheck(results: Results) -> list[str]:
    """
    How many times better direct is than each relay on each scenario's speed
    figure; the router must be at least L{SELF_CHECK_FACTOR} behind.
    """
    lines = []
    for name, byRelay in results.items():
        sc = SCENARIOS[name]
        if sc.speedKey is None or "direct" not in byRelay:
            continue
        d = median(byRelay["direct"], sc.speedKey)
        better = next(m.better for m in sc.metrics if m.key == sc.speedKey)
        parts = []
        verdict = ""
        for relay, runs in byRelay.items():
            r = median(runs, sc.speedKey)
            if relay == "direct" or r is None or d is None or r == 0 or d == 0:
                continue
            factor = d / r if better == "high" else r / d
            parts.append(f"{relay} {factor:.2f}x")
            if relay == "router":
                if sc.placement == "shared":
                    # One CPU: the tool's own time adds to every relay's
                    # equally rather than capping it; informational only.
                    verdict = " (informational: on one CPU the ends' cost is added, not a cap)"
                elif factor >= SELF_CHECK_FACTOR:
                    verdict = " — ok"
                else:
                    busy = median(runs, "endsBusy")
                    verdict = f" — WARNING: under {SELF_CHECK_FACTOR:g}x"
                    if busy is not None:
                        verdict += (
                            f"; the backend and load generator were {busy:.0f}% busy (of one CPU) "
                            + ("so they may have set the pace" if busy >= 90 else
                               "so the relay path, not they, set the pace")
                        )
                    else:
                        verdict += ", the tool may be measuring itself"
        if parts:
            lines.append(f"- {name}: direct is better than " + ", ".join(parts) + verdict)
    return lines


def _m(results: Results, scenario: str, relay: str, key: str) -> Optional[float]:
    return median(results.get(scenario, {}).get(relay, []), key)


def targets(results: Results, sizes: Sizes) -> list[str]:
    """
    Issue 4's targets for the router, judged on the medians.
    """
    lines = []

    def judge(label: str, value: Optional[float], limit: Optional[float], op: str, unit: str = "") -> None:
        if value is None or limit is None:
            return
        ok = value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit
        lines.append(
            f"- {'PASS' if ok else 'FAIL'} {label}: {value:.4g}{unit} (target {op} {limit:.4g}{unit})"
        )

    def rel(scenario: str, key: str, factor: float) -> Optional[float]:
        p = _m(results, scenario, "proxyd", key)
        return None if p is None else p * factor

    for sc in ("bulk-down", "bulk-up"):
        judge(f"{sc} MB/s >= 0.9x proxyd", _m(results, sc, "router", "mbps"), rel(sc, "mbps", 0.9), ">=")
        judge(
            f"{sc} CPU s/GiB <= 1.5x proxyd",
            _m(results, sc, "router", "cpuPerGiB"),
            rel(sc, "cpuPerGiB", 1.5),
            "<=",
        )
    for sc in ("latency", "latency-1cpu"):
        judge(f"{sc} p50 <= proxyd", _m(results, sc, "router", "p50"), rel(sc, "p50", 1.0), "<=", " µs")
        judge(f"{sc} relay CPU <= 80 µs/req", _m(results, sc, "router", "cpuPerReq"), 80.0, "<=", " µs")
    for sc in ("connrate-1", "connrate-32"):
        judge(f"{sc} conn/s >= 0.8x proxyd", _m(results, sc, "router", "connps"), rel(sc, "connps", 0.8), ">=")
    # Issue 10: with metrics on, the router's CPU per connection at most 0.7x
    # the naive portforward relay's, and what metrics cost.
    portforward = _m(results, "connrate-1", "portforward", "cpuPerConn")
    withMetrics = _m(results, "connrate-1", "router-metrics", "cpuPerConn")
    judge(
        "connrate-1 relay CPU/conn with metrics <= 0.7x portforward",
        withMetrics,
        None if portforward is None else 0.7 * portforward,
        "<=",
        " µs",
    )
    without = _m(results, "connrate-1", "router", "cpuPerConn")
    if withMetrics is not None and without is not None:
        lines.append(
            f"- connrate-1 cost of metrics: {withMetrics:.0f} µs/conn on, {without:.0f} off "
            f"({withMetrics - without:+.0f} µs)"
        )
    runs = results.get("concurrency", {}).get("router")
    if runs:
        good = [r for r in runs if "error" not in r and r["answered"] == sizes.concurrentConns]
        lines.append(
            f"- {'PASS' if len(good) == len(runs) else 'FAIL'} concurrency: all "
            f"{sizes.concurrentConns} answered in {len(good)}/{len(runs)} runs"
        )
        judge("concurrency RSS per connection <= 4 KiB", _m(results, "concurrency", "router", "rssPerConn"), 4.0, "<=", " KiB")
        judge("concurrency PSS per connection <= 4 KiB", _m(results, "concurrency", "router", "pssPerConn"), 4.0, "<=", " KiB")
    judge("slow reader peak growth < 2 MiB", _m(results, "slow", "router", "peakGrowth"), 2.0, "<", " MiB")
    return lines
