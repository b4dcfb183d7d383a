"""
The open the relay makes on the reactor thread (L{CachedOpener}): the
kernel's answer from its caches for a link-free path on a local file
system, and L{NotCached} for everything else.
"""

import os
import shutil
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.relay.cached import LOCAL, CachedOpener, NotCached, readMounts


class CachedOpenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.opener = CachedOpener(self.clock.seconds)
        if not self.opener.available:
            self.skipTest("no openat2 RESOLVE_CACHED or statx mount id on this kernel (before 5.12)")
        self.directory = tempfile.mkdtemp(prefix="dr-cached-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "docker.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(self.listener.close)
        self.listener.bind(self.path)
        kind = readMounts()[self._mountOf(self.directory)]
        if kind not in LOCAL:
            self.skipTest(f"the test directory is on {kind}, not a local file system")

    def _mountOf(self, path: str) -> int:
        fd = os.open(path, os.O_PATH)
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))
        finally:
            os.close(fd)

    def test_socketOnALocalFileSystem(self) -> None:
        """What it opens and says is what C{stat} says of the path."""
        os.stat(self.path)  # in the cache now
        fd, target = self.opener(self.path)
        self.addCleanup(os.close, fd)
        expected = os.stat(self.path)
        self.assertEqual(
            (target.st_mode, target.st_uid, target.st_dev, target.st_ino),
            (expected.st_mode, expected.st_uid, expected.st_dev, expected.st_ino),
        )
        self.assertEqual(os.fstat(fd).st_ino, expected.st_ino)

    def test_linkIsNotFollowed(self) -> None:
        """A link anywhere on the path sends the look to a worker."""
        link = os.path.join(self.directory, "link")
        os.symlink(self.directory, link)
        self.assertRaises(NotCached, self.opener, os.path.join(link, "docker.sock"))
        os.symlink(self.path, os.path.join(self.directory, "to-socket"))
        self.assertRaises(NotCached, self.opener, os.path.join(self.directory, "to-socket"))

    def test_missingIsTheKernelsAnswer(self) -> None:
        """
        Nothing there is an answer once the kernel has cached that (a
        negative entry); a name never looked up needs the file system.
        """
        missing = os.path.join(self.directory, "nothing")
        self.assertRaises(NotCached, self.opener, missing)
        self.assertFalse(os.path.exists(missing))
        self.assertRaises(FileNotFoundError, self.opener, missing)

    def test_notInTheCache(self) -> None:
        """
        A path whose entries the kernel would have to read from the disk
        (dropped from the dentry cache) is not opened here; once a look has
        cached it, it is.
        """
        if os.geteuid() != 0:
            self.skipTest("dropping the kernel's dentry cache needs root")
        path = os.path.join(self.directory, "cold", "file")
        os.makedirs(os.path.dirname(path))
        open(path, "w").close()
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        self.assertRaises(NotCached, self.opener, path)
        os.stat(path)
        fd, _ = self.opener(path)
        os.close(fd)

    def test_otherFileSystems(self) -> None:
        """
        A file on a mount of a file system that may have to ask a server or
        a process (FUSE, NFS) is left to the workers; the mount table is
        read again for an unknown mount at most once a second.
        """
        reads = []

        def mounts() -> dict[int, str]:
            reads.append(self.clock.seconds())
            return {self._mountOf(self.directory): "fuse.sshfs"}

        opener = CachedOpener(self.clock.seconds, mounts)
        self.assertRaises(NotCached, opener, self.path)
        self.assertEqual(reads, [0.0])

        def noMounts() -> dict[int, str]:
            reads.append(self.clock.seconds())
            return {}

        opener = CachedOpener(self.clock.seconds, noMounts)
        self.assertRaises(NotCached, opener, self.path)
        self.assertRaises(NotCached, opener, self.path)
        self.clock.advance(1)
        self.assertRaises(NotCached, opener, self.path)
        self.assertEqual(reads, [0.0, 0.0, 1.0])
