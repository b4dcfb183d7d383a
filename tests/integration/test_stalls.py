"""
No user can stall the router for everyone: a path that takes long to walk
(symbolic links through a deep tree) or never answers (a FUSE mount that
holds every lookup) holds only its own user's connections, while another
user's requests go on.
"""

import os
import shutil
import subprocess
import threading
import unittest

from tests.integration.harness import UID_A, UID_B, IntegrationTestCase, b64, lineRequest
from tests.integration.test_hardening import figure

REQUEST = lineRequest()
CYCLES = 300
# The slowest of the other user's cycles may take: generous, functional.
WORST = 1.0
DEBIAN_PYTHON = "/usr/bin/python3"
HUNG_FUSE = os.path.join(os.path.dirname(__file__), "hungfuse.py")


def deepLinks(testCase, top, links=39):
    """
    In C{top}: a tree as deep as a path of about 4,092 bytes allows, and
    C{links} symbolic links at its bottom, each to the next through the
    whole tree (the last to nothing); the first link's path.
    """
    prefix = os.path.join(top, "t")
    os.mkdir(prefix)
    # Too deep for shutil.rmtree's recursion.
    testCase.addCleanup(subprocess.call, ["rm", "-rf", prefix])
    depth = (4092 - len(prefix) - len("/l99")) // 2
    fd = os.open(prefix, os.O_PATH)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            inner = os.open("a", os.O_PATH, dir_fd=fd)
            os.close(fd)
            fd = inner
        deep = prefix + "/a" * depth
        for n in range(1, links + 1):
            os.symlink("%s/l%d" % (deep, n + 1), "l%d" % (n,), dir_fd=fd)
    finally:
        os.close(fd)
    return deep + "/l1"


class StallTests(IntegrationTestCase):
    """
    While one user's connections look at a path that stalls, another
    user's 300 request cycles all succeed, none slower than a second.
    """

    def otherUserGoesOn(self, router):
        """
        UID_B's cycles while UID_A keeps connecting to its path; UID_A's
        connections end (answered, at the latest after the connect
        timeout), and the router lives.
        """
        attacker = self.harness.startAgent(UID_A)
        attacks = {}

        def attack():
            attacks.update(
                attacker.call(
                    "latencyLoop", seconds=200, path=router.listenPath, data=b64(REQUEST), count=6, deadline=60
                )
            )

        thread = threading.Thread(target=attack)
        thread.start()
        self.addCleanup(thread.join)
        loop = self.harness.startAgent(UID_B).call(
            "latencyLoop",
            seconds=200,
            path=router.listenPath,
            data=b64(REQUEST),
            count=CYCLES,
            timeout=5,
            deadline=60,
        )
        self.assertEqual(loop["errors"], {}, router.evidence())
        self.assertEqual(loop["statuses"], {"HTTP/1.1 200 OK": CYCLES}, router.evidence())
        self.assertLess(max(loop["times"]), WORST, router.evidence())
        times = sorted(loop["times"])
        figure(
            f"{self.id().rsplit('.', 1)[-1]}: the other user's {CYCLES} cycles",
            "median %.1f ms, worst %.1f ms" % (1000 * times[len(times) // 2], 1000 * times[-1]),
        )
        thread.join(120)
        self.assertIsNone(router.process.poll(), router.evidence())
        return attacks

    def test_linksThroughADeepTree(self):
        """
        39 links, each to a 4,092-byte path through a 2,037-level tree, in
        the user's own directory: the kernel's open fails in milliseconds,
        and the walk as the user stops at its bound.
        """
        router = self.harness.startRouter()
        self.harness.startBackend(UID_B, "http")
        first = deepLinks(self, self.harness.userDirectory(UID_A))
        self.harness.symlink(first, self.harness.backendPath(UID_A), owner=UID_A)
        attacks = self.otherUserGoesOn(router)
        # Each of the attacker's connections had its answer, not a hang.
        self.assertEqual(attacks["errors"], {}, attacks)
        self.assertEqual(sum(attacks["statuses"].values()), 6, attacks)
        self.assertEqual(list(attacks["statuses"]), ["HTTP/1.1 502 Bad Gateway"], attacks)

    def test_fuseLookupThatNeverAnswers(self):
        """
        The user's path leads into an C{allow_other} FUSE mount whose
        lookups never answer: their connections are answered after the
        connect timeout, and the other user never notices.
        """
        if shutil.which(DEBIAN_PYTHON) is None or subprocess.call(
            [DEBIAN_PYTHON, "-c", "import fusepy"], stderr=subprocess.DEVNULL
        ):
            raise unittest.SkipTest("needs Debian's python3-fusepy")
        if not os.path.exists("/dev/fuse"):
            raise unittest.SkipTest("needs /dev/fuse")
        mountpoint = os.path.join(self.harness.userDirectory(UID_A), "fuse")
        os.mkdir(mountpoint)
        fuse = subprocess.Popen([DEBIAN_PYTHON, HUNG_FUSE, mountpoint], stdout=subprocess.PIPE)
        # Killed first (its held lookups then fail), then unmounted.
        self.addCleanup(subprocess.call, ["umount", "-l", mountpoint])
        self.addCleanup(fuse.wait)
        self.addCleanup(fuse.kill)
        self.assertEqual(fuse.stdout.readline(), b"ready\n")
        self.harness.symlink(os.path.join(mountpoint, "docker.sock"), self.harness.backendPath(UID_A), owner=UID_A)
        router = self.harness.startRouter(args=["--connect-timeout", "2"])
        self.harness.startBackend(UID_B, "http")
        attacks = self.otherUserGoesOn(router)
        # Answered within the connect timeout (and a little), not held.
        self.assertEqual(attacks["errors"], {}, attacks)
        self.assertEqual(list(attacks["statuses"]), ["HTTP/1.1 502 Bad Gateway"], attacks)
        self.assertLess(max(attacks["times"]), 2 + WORST, attacks)
        router.waitLog(r"rejected uid=%d .*cause=path-timeout$" % (UID_A,))
