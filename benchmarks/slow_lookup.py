"""
One user's request latency while another user's user database lookup is
slow (an LDAP server that takes seconds): C{python -m benchmarks.slow_lookup
[--slow-lookup 2]}, as root.

The router runs with C{pwd.getpwuid} made slow on purpose for one uid (in
the router's process only, by a wrapper: this knob exists in the benchmark,
not in the router).  A client of that uid connects once, and while its
lookup is in flight another user runs whole request cycles through the
router; their latency is compared with the same loop without the slow
lookup.  With lookups in the reactor thread, the other user's worst cycle
would be the whole lookup.
"""

import argparse
import json
import os
import statistics
import sys
import time

from tests.integration.harness import UID_A, UID_B, Deadline, Harness, b64, lineRequest

# Patches pwd.getpwuid in the router process, then runs twistd.
_WRAPPER = """
import pwd, sys, time
slowUid, seconds = int(sys.argv[1]), float(sys.argv[2])
real = pwd.getpwuid
def getpwuid(uid):
    if uid == slowUid:
        time.sleep(seconds)
    return real(uid)
pwd.getpwuid = getpwuid
sys.argv = ["twistd"] + sys.argv[4:]  # after the twistd script itself
from twisted.scripts.twistd import run
run()
"""


class _Cleanups:
    """What L{Harness} needs of a test case."""

    def __init__(self) -> None:
        self.calls: list = []

    def addCleanup(self, f, *args) -> None:
        self.calls.append((f, args))

    def run(self) -> None:
        for f, args in reversed(self.calls):
            f(*args)


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return dict(
        cycles=len(times),
        p50_ms=round(statistics.median(times) * 1e3, 3),
        p99_ms=round(times[int(len(times) * 0.99) - 1] * 1e3, 3),
        max_ms=round(times[-1] * 1e3, 3),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slow-lookup", type=float, default=2.0, help="seconds one uid's lookup takes")
    p.add_argument("--cycles", type=int, default=300, help="request cycles per measurement")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: clients run as other uids", file=sys.stderr)
        return 2
    cleanups = _Cleanups()
    harness = Harness(cleanups)
    try:
        wrapper = [sys.executable, "-c", _WRAPPER, str(UID_B), str(args.slow_lookup)]
        router = harness.startRouter(wrapper=wrapper)
        harness.startBackend(UID_A, "http")
        fast = harness.startAgent(UID_A)
        request = b64(lineRequest())
        fast.call("latencyLoop", path=router.listenPath, data=request, count=50)  # name remembered
        baseline = fast.call("latencyLoop", path=router.listenPath, data=request, count=args.cycles)
        slow = harness.startAgent(UID_B)
        slow.process.stdin.write((json.dumps(dict(op="http", path=router.listenPath, method="GET", url="/_ping")) + "\n").encode())
        slow.process.stdin.flush()
        # Cycles until the slow client is answered: all of them overlap its lookup.
        during: list[float] = []
        started = time.monotonic()
        deadline = Deadline(args.slow_lookup * 5 + 30)
        while slow.count("reply") == 0 and not deadline.expired():
            during += fast.call("latencyLoop", path=router.listenPath, data=request, count=20)["times"]
        _, reply = slow.waitEvent("reply", 30)
        waited = time.monotonic() - started
        figures = dict(
            slow_lookup_s=args.slow_lookup,
            slow_client_answered_after_s=round(reply["elapsed"], 3),
            other_user_baseline=summary(baseline["times"]),
            other_user_during_slow_lookup=summary(during),
            overlap_s=round(waited, 3),
        )
        print(json.dumps(figures, indent=2))
        return 0
    finally:
        cleanups.run()


if __name__ == "__main__":
    sys.exit(main())
