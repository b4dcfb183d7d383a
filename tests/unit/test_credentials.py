"""
Peer credentials come from the kernel.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import unittest

from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.credentials import Credentials, peerCredentials


class PeerCredentialsTests(SynchronousTestCase):
    def test_socketpair(self) -> None:
        """
        The credentials of a socketpair's peer are this process's own.
        """
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertEqual(
            peerCredentials(a), Credentials(os.getpid(), os.getuid(), os.getgid())
        )


class UnsignedIdsTests(SynchronousTestCase):
    def test_uidAbove2To31(self) -> None:
        """
        Finding 12.3: a real process running as uid 3000000000 is that uid,
        not -1294967296.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root, to run a process as another uid")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "s")
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen()
        big = 3_000_000_000
        subprocess.run(
            ["/usr/bin/python3", "-I", "-c", "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])", path],
            user=big,
            group=big + 1,
            extra_groups=[],
            check=True,
        )
        sock, _ = listener.accept()
        self.addCleanup(sock.close)
        credentials = peerCredentials(sock)
        self.assertEqual((credentials.uid, credentials.gid), (big, big + 1))
