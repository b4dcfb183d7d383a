"""
Test doubles for driving the router's protocols without sockets.
"""

import os
import errno
import socket
import stat
from typing import Any, Callable, Optional, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import StringTransport

from dockerrouter.relay.cached import NotCached
from dockerrouter.routing.credentials import _GID, _UCRED, SO_PEERGROUPS, Credentials


class FakeSocket:
    """
    A connected socket (one end of a real, idle socketpair, so that the
    relay's system calls work on it) that answers C{SO_PEERCRED} with the
    credentials it was given.
    """

    def __init__(self, credentials: Credentials, groups: Optional[tuple[int, ...]] = ()) -> None:
        """
        @param groups: the peer's supplementary groups, or C{None} for a peer
            in more than the kernel will tell (C{ERANGE}).
        """
        self.credentials = credentials
        self.groups = groups
        self._sock, self._peer = socket.socketpair()
        self._sock.setblocking(False)
        self.fd = self._sock.fileno()

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self._sock.close()
        self._peer.close()

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert level == socket.SOL_SOCKET
        if option == SO_PEERGROUPS:
            if self.groups is None:
                raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
            return b"".join(_GID.pack(gid) for gid in self.groups)
        assert (option, size) == (socket.SO_PEERCRED, _UCRED.size)
        c = self.credentials
        return _UCRED.pack(c.pid, c.uid, c.gid)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self._sock.setsockopt(level, option, value)

    def recv(self, size: int, flags: int = 0) -> bytes:
        return self._sock.recv(size, flags)

    @property
    def peer(self) -> socket.socket:
        """The other end: the client's, for what it sends."""
        return self._peer


def asSocket(fake: FakeSocket) -> socket.socket:
    """
    C{fake} where the router takes a socket: it answers every call the
    router makes on one (a cast, as no type says that).
    """
    return cast(socket.socket, fake)


class PeerTransport(StringTransport):
    """
    A L{StringTransport} with a peer's credentials and the half-close and
    disconnect bookkeeping the relay looks at.
    """

    disconnected = False
    writeClosed = False
    aborted = False
    reading = True

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._socket = FakeSocket(credentials)

    def stopReading(self) -> None:
        self.reading = False

    def getHandle(self) -> FakeSocket:
        return self._socket

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def socketFile(uid: int) -> tuple[int, os.stat_result]:
    """
    What C{RouterFactory.openSocketFile} returns for a socket owned by
    C{uid}: a real descriptor (of C{/}, which the relay closes) and a
    socket's C{stat}.
    """
    fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    return fd, os.stat_result((stat.S_IFSOCK | 0o600, 1, 1, 1, uid, uid, 0, 0, 0, 0))


def notCached(path: str) -> tuple[int, os.stat_result]:
    """A C{RouterFactory.openCached} that sends every look to the workers."""
    raise NotCached()


class InlineWorkers:
    """
    L{dockerrouter.relay.workers.Workers} that runs each job at once, in the
    caller's thread: the relay's protocol logic, driven synchronously.
    With C{held}, jobs wait until the test calls L{finish}.
    """

    def __init__(self, held: bool = False) -> None:
        self.held = held
        self.jobs: list[tuple[Callable[..., Any], tuple, Optional[Callable[[Any], None]], Deferred]] = []

    def run(
        self, uid: int, function: Callable[..., Any], *args: Any, discard: Optional[Callable[[Any], None]] = None
    ) -> Deferred:
        if not self.held:
            return maybeDeferred(function, *args)
        d: Deferred = Deferred()
        self.jobs.append((function, args, discard, d))
        return d

    def finish(self) -> None:
        """Run the oldest job held; answer its caller, or discard if gone."""
        function, args, discard, d = self.jobs.pop(0)
        result = function(*args)
        if not d.called:
            d.callback(result)
        elif discard is not None:
            discard(result)
