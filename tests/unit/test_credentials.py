"""
Peer credentials come from the kernel.
"""

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.credentials import Credentials, peerCredentials


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

    def test_frozen(self) -> None:
        """
        Credentials are values: equal by content and immutable.
        """
        c = Credentials(pid=1, uid=2, gid=3)
        self.assertEqual(c, Credentials(1, 2, 3))
        with self.assertRaises(AttributeError):
            c.uid = 0  # type: ignore[misc]
