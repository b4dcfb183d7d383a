"""
Reading the owner of a client's user namespace, with real processes in real
namespaces (made with util-linux C{unshare}, as an unprivileged uid).
"""

import os
import resource
import shutil
import socket
import subprocess
import tempfile
import unittest

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing import namespaces
from dockerrouter.routing.namespaces import outermostOwner

USER = 61001
# Connects, says so, and stays until its stdin closes.
_CLIENT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "print('connected', flush=True); sys.stdin.read()"
)


class OutermostOwnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise unittest.SkipTest("needs root (to run clients as another uid) and unshare")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        os.chmod(directory, 0o755)
        self.path = os.path.join(directory, "router.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(self.listener.close)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o666)
        self.listener.listen()

    def client(self, *unshares: str) -> tuple[socket.socket, subprocess.Popen]:
        """
        A client as uid L{USER}, in the user namespaces C{unshare} makes
        with C{unshares} (each a list of its options), connected.
        """
        command: list[str] = []
        for options in unshares:
            command += ["unshare", *options.split()]
        process = subprocess.Popen(
            command + ["/usr/bin/python3", "-I", "-c", _CLIENT, self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=USER,
            group=USER,
            extra_groups=[],
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.stdin.close)
        self.assertEqual(process.stdout.readline(), b"connected\n")
        sock, _ = self.listener.accept()
        self.addCleanup(sock.close)
        return sock, process

    def test_ownNamespace(self) -> None:
        """
        A process in the router's own namespace is in no other: no owner.
        """
        sock, process = self.client()
        self.assertIsNone(outermostOwner(sock, process.pid))

    def test_namespaceOfTheUser(self) -> None:
        sock, process = self.client("-U")
        self.assertEqual(outermostOwner(sock, process.pid), USER)

    def test_nested(self) -> None:
        """
        The owner of the outermost namespace counts, however deep the
        client is.
        """
        sock, process = self.client("-U -r", "-U -r", "-U")
        self.assertEqual(outermostOwner(sock, process.pid), USER)

    def test_goneIsNoProof(self) -> None:
        sock, process = self.client("-U")
        process.stdin.close()
        process.wait()
        self.assertIsNone(outermostOwner(sock, process.pid))

    def test_withoutTheNamespaceIoctl(self) -> None:
        """
        Kernels 6.5 to 6.10: the peer's pidfd, then /proc/<pid>/ns/user.
        """
        self.patch(namespaces, "PIDFD_GET_USER_NAMESPACE", 0xFF7F)
        sock, process = self.client("-U")
        self.assertEqual(outermostOwner(sock, process.pid), USER)
        process.stdin.close()
        process.wait()
        self.assertIsNone(outermostOwner(sock, process.pid))

    def test_withoutTheNamespaceIoctlPastSelectsLimit(self) -> None:
        """
        The same with the router's descriptors past 1024, as under load:
        the peer's pidfd is numbered past what select(2) can take.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 2048:
            raise unittest.SkipTest(f"the hard descriptor limit {hard} is below 2048")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        self.patch(namespaces, "PIDFD_GET_USER_NAMESPACE", 0xFF7F)
        sock, process = self.client("-U")
        filler: list[int] = []
        while not filler or filler[-1] < 1100:
            filler.append(os.dup(sock.fileno()))
        for fd in filler:
            self.addCleanup(os.close, fd)
        self.assertEqual(outermostOwner(sock, process.pid), USER)

    def test_withoutPeerPidfd(self) -> None:
        """
        Kernels before 6.5: /proc/<pid>/ns/user of a process that started
        before the connection was accepted.
        """
        self.patch(namespaces, "SO_PEERPIDFD", 0x7FFF)
        sock, process = self.client("-U -r", "-U")
        self.assertEqual(outermostOwner(sock, process.pid), USER)
        process.stdin.close()
        process.wait()
        self.assertIsNone(outermostOwner(sock, process.pid))


class DeniedTests(SynchronousTestCase):
    def test_warnsOnce(self) -> None:
        """
        Without CAP_SYS_PTRACE the kernel refuses every namespace: the
        operator reads why once, each client routes as itself.
        """

        def denied(sock, pid):
            raise PermissionError(13, "Permission denied")

        self.patch(namespaces, "_peerNamespace", denied)
        self.patch(namespaces, "_warnedDenied", False)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        with capturedLogs() as events:
            self.assertEqual([outermostOwner(sock, 1), outermostOwner(sock, 2)], [None, None])
        [warning] = events
        self.assertIn("CAP_SYS_PTRACE", warning["log_format"])
