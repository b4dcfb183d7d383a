"""
Reading the owner of a client's user namespace, with real processes in real
namespaces (made with util-linux C{unshare}, as an unprivileged uid).
"""

import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
from typing import Optional

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing import namespaces
from dockerrouter.routing.credentials import Credentials
from dockerrouter.routing.namespaces import ROUTERS, namespaceOf, peerInode
from tests.pids import spawnAtPid

USER = 61001
GROUP = 4242
# Connects, says so, and stays until its stdin closes.
_CLIENT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "print('connected', flush=True); sys.stdin.read()"
)
# Has a child connect, and keeps the socket once the child has exited (as
# an attacker hands a connection on): says the child's pid.
_HANDING_ON = (
    "import os, socket, sys; s = socket.socket(socket.AF_UNIX); child = os.fork()\n"
    "if child == 0:\n s.connect(sys.argv[1]); os._exit(0)\n"
    "os.waitpid(child, 0); print(child, flush=True); sys.stdin.read()"
)
# Says it is there, and stays until its stdin closes.
_STAY = "import sys; print('here', flush=True); sys.stdin.read()"


def _kernelHasPeerPidfd() -> bool:
    """Whether this kernel has C{SO_PEERPIDFD} (Linux 6.5; Debian 12's 6.1 has not)."""
    a, b = socket.socketpair()
    with a, b:
        try:
            pidfd = a.getsockopt(socket.SOL_SOCKET, namespaces.SO_PEERPIDFD, 4)
        except OSError:
            return False
    os.close(int.from_bytes(pidfd, sys.byteorder, signed=True))
    return True


def owner(sock: socket.socket, pid: int, groups: Optional[frozenset[int]] = None) -> Optional[int]:
    """L{namespaceOf} a client of uid and gid L{USER} at C{pid}."""
    return namespaceOf(sock, Credentials(pid, USER, USER), groups)


class NamespaceOfTests(SynchronousTestCase):
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

    def start(self, program: str, *unshares: str, groups: tuple[int, ...] = ()) -> subprocess.Popen:
        """
        C{program} as uid L{USER} (in C{groups}), in the user namespaces
        C{unshare} makes with C{unshares} (each a list of its options),
        given the router's path; it ends when its stdin closes.
        """
        command: list[str] = []
        for options in unshares:
            command += ["unshare", *options.split()]
        process = subprocess.Popen(
            command + ["/usr/bin/python3", "-I", "-c", program, self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=USER,
            group=USER,
            extra_groups=list(groups),
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.stdin.close)
        return process

    def client(self, *unshares: str, groups: tuple[int, ...] = ()) -> tuple[socket.socket, subprocess.Popen]:
        """A client as uid L{USER} (see L{start}), connected."""
        process = self.start(_CLIENT, *unshares, groups=groups)
        self.assertEqual(process.stdout.readline(), b"connected\n")
        sock, _ = self.listener.accept()
        self.addCleanup(sock.close)
        return sock, process

    def handedOn(self, *unshares: str) -> tuple[socket.socket, int]:
        """
        A connection whose connecting process (uid L{USER}) has exited,
        held by its parent, and the connector's pid, now free.
        """
        process = self.start(_HANDING_ON, *unshares)
        connector = int(process.stdout.readline())
        sock, _ = self.listener.accept()
        self.addCleanup(sock.close)
        return sock, connector

    def takePid(self, pid: int, *unshares: str) -> subprocess.Popen:
        """A process as uid L{USER} in C{unshares}, at pid C{pid}."""
        command: list[str] = []
        for options in unshares:
            command += ["unshare", *options.split()]
        process = spawnAtPid(
            pid,
            command + ["/usr/bin/python3", "-I", "-c", _STAY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=USER,
            group=USER,
            extra_groups=[],
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.stdin.close)
        self.assertEqual(process.stdout.readline(), b"here\n")
        return process

    def withoutPeerPidfd(self) -> None:
        """Be a kernel before 6.5, which has no C{SO_PEERPIDFD}."""
        self.patch(namespaces, "SO_PEERPIDFD", 0x7FFF)
        self.patch(namespaces, "_provable", None)

    def test_ownNamespace(self) -> None:
        """
        A process in the router's own namespace is in no other: no owner.
        """
        sock, process = self.client()
        self.assertEqual(owner(sock, process.pid), ROUTERS)

    def test_namespaceOfTheUser(self) -> None:
        sock, process = self.client("-U")
        self.assertEqual(owner(sock, process.pid), USER)

    def test_nested(self) -> None:
        """
        The owner of the outermost namespace counts, however deep the
        client is.
        """
        sock, process = self.client("-U -r", "-U -r", "-U")
        self.assertEqual(owner(sock, process.pid), USER)

    def test_goneIsNoProof(self) -> None:
        sock, process = self.client("-U")
        process.stdin.close()
        process.wait()
        self.assertIsNone(owner(sock, process.pid))

    def test_withoutTheNamespaceIoctl(self) -> None:
        """
        Kernels 6.5 to 6.10: the peer's pidfd, then /proc/<pid>/ns/user.
        """
        self.patch(namespaces, "PIDFD_GET_USER_NAMESPACE", 0xFF7F)
        sock, process = self.client("-U")
        self.assertEqual(owner(sock, process.pid), USER)
        process.stdin.close()
        process.wait()
        self.assertIsNone(owner(sock, process.pid))

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
        self.assertEqual(owner(sock, process.pid), USER)

    def test_withoutPeerPidfd(self) -> None:
        """
        Kernels before 6.5: /proc/<pid>/ns/user of the process proven to
        hold the connection (its client end is among its descriptors); once
        it is gone, not a process of a namespace of USER's that took its pid.
        """
        self.withoutPeerPidfd()
        sock, process = self.client("-U -r", "-U")
        self.assertEqual(owner(sock, process.pid), USER)
        process.stdin.close()
        process.wait()
        self.takePid(process.pid, "-U")
        self.assertIsNone(owner(sock, process.pid))

    def test_withoutPeerPidfdAPidReused(self) -> None:
        """
        Finding 16.2: the connecting process handed its connection on and
        exited, and a process in a namespace of USER's took its pid: that
        process does not hold the connection, so it proves nothing.
        """
        self.withoutPeerPidfd()
        sock, connector = self.handedOn()
        self.takePid(connector, "-U")
        self.assertIsNone(owner(sock, connector))

    def test_withoutPeerPidfdTheHoldersGroups(self) -> None:
        """
        A process of the router's namespace proven to hold the connection
        may not be the one that connected: its groups are trusted only if
        it has them itself.  (With SO_PEERPIDFD the connector is known: on
        a kernel that has it, the groups it connected with count.)
        """
        sock, process = self.client(groups=(GROUP,))
        self.assertEqual(owner(sock, process.pid, frozenset({USER, GROUP + 1})),
                         ROUTERS if _kernelHasPeerPidfd() else None)
        self.withoutPeerPidfd()
        self.assertEqual(owner(sock, process.pid, frozenset({USER, GROUP})), ROUTERS)
        self.assertIsNone(owner(sock, process.pid, frozenset({USER, GROUP + 1})))
        self.assertIsNone(namespaceOf(sock, Credentials(process.pid, USER, GROUP), frozenset({GROUP})))

    def test_peerInode(self) -> None:
        """unix_diag names the socket at the other end."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.assertEqual(peerInode(ours), os.fstat(theirs.fileno()).st_ino)
            self.assertEqual(peerInode(theirs), os.fstat(ours.fileno()).st_ino)


class ProvableTests(SynchronousTestCase):
    def test_warnsOnce(self) -> None:
        """
        Without SO_PEERPIDFD and unix_diag nothing can be proven: the
        operator reads it once, with the kernel that would.
        """

        def noDiag(sock: socket.socket) -> int:
            raise OSError(97, "Address family not supported by protocol")

        self.patch(namespaces, "SO_PEERPIDFD", 0x7FFF)
        self.patch(namespaces, "_provable", None)
        self.patch(namespaces, "peerInode", noDiag)
        with capturedLogs() as events:
            self.assertEqual([namespaces.provable(), namespaces.provable()], [False, False])
        [warning] = events
        self.assertIn("Linux 6.5", warning["log_format"])
        self.patch(namespaces, "_provable", None)
        self.patch(namespaces, "peerInode", lambda sock: 0)
        self.assertFalse(namespaces.provable())


class DeniedTests(SynchronousTestCase):
    def test_warnsOnce(self) -> None:
        """
        Without CAP_SYS_PTRACE the kernel refuses every namespace: the
        operator reads why once, each client routes as itself.
        """

        def denied(sock, client, groups):
            raise PermissionError(13, "Permission denied")

        def owner(sock: socket.socket, pid: int) -> Optional[int]:
            return namespaceOf(sock, Credentials(pid, USER, USER))


        self.patch(namespaces, "_peerNamespace", denied)
        self.patch(namespaces, "_warnedDenied", False)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        with capturedLogs() as events:
            self.assertEqual([owner(sock, 1), owner(sock, 2)], [None, None])
        [warning] = events
        self.assertIn("CAP_SYS_PTRACE", warning["log_format"])
