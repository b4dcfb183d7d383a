"""
Reusing a pid on purpose, as an attacker burning pids would, but at once:
the kernel hands out next the pid after the one written to
C{/proc/sys/kernel/ns_last_pid} (root only).
"""

import os
import subprocess
import time


def spawnAtPid(pid: int, argv: list, seconds: float = 10, **popenArgs) -> subprocess.Popen:
    """
    Start C{argv} (with C{subprocess.Popen}'s C{popenArgs}) as process
    C{pid}, a pid just freed.  Another process starting at the same moment
    may take it first: tried again, until C{seconds} pass.
    """
    deadline = time.monotonic() + seconds
    while True:
        if not os.path.exists(f"/proc/{pid}"):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
            process = subprocess.Popen(argv, **popenArgs)
            if process.pid == pid:
                return process
            process.kill()
            process.wait()
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} could not be had within {seconds}s")
        time.sleep(0.01)
