"""
Test doubles for driving the router's protocols without sockets.
"""

import socket

from twisted.internet.testing import StringTransport

from dockerrouter.credentials import _UCRED, Credentials


class FakeSocket:
    """Answers C{SO_PEERCRED} with the credentials it was given."""

    def __init__(self, credentials: Credentials, fd: int) -> None:
        self.credentials = credentials
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        pass

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        c = self.credentials
        return _UCRED.pack(c.pid, c.uid, c.gid)


class PeerTransport(StringTransport):
    """
    A L{StringTransport} with a peer's credentials and the half-close and
    disconnect bookkeeping the relay looks at.
    """

    disconnected = False
    writeClosed = False
    aborted = False
    reading = True
    _fds = iter(range(1000, 10**6))

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._socket = FakeSocket(credentials, next(self._fds))

    def stopReading(self) -> None:
        self.reading = False

    def getHandle(self) -> FakeSocket:
        return self._socket

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()
