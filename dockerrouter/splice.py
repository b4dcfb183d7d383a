"""
Moves a paired relay's bytes inside the kernel.

Copying through Python (C{recv}, C{dataReceived}, C{write}) costs the router
several times the CPU of a C relay.  Here each direction goes from one socket
into a pipe and from the pipe into the other socket with C{splice(2)}, so the
bytes never enter user space; the router still counts them, still passes an
end-of-file on as a half-close, and still pushes back: a direction reads its
source only while its pipe is empty, so a slow reader stalls the writer in
the kernel and the router holds at most one pipe per busy direction.

Pipes are lent from a L{PipePool} while bytes are in flight and given back
when the direction is drained, so thousands of idle connections hold none.
"""

import errno
import fcntl
import os
import socket
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReadWriteDescriptor
from zope.interface import implementer

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_CHUNK = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """
    Empty pipes to lend to directions with bytes in flight.
    """

    def __init__(self, size: int = _CHUNK, keep: int = 16) -> None:
        self._size = size
        self._keep = keep
        self._idle: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if self._idle:
            return self._idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, self._size)
        except OSError:
            pass  # a smaller pipe only means more calls
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Take back a pipe; it must be empty."""
        if len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            _closePipe(pipe)

    def close(self) -> None:
        while self._idle:
            _closePipe(self._idle.pop())


def _closePipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


class _Direction:
    """Bytes from C{source} to C{sink}, and what is in flight between them."""

    __slots__ = ("source", "sink", "pipe", "pending", "count", "eof", "done")

    def __init__(self, source: "_End", sink: "_End") -> None:
        self.source = source
        self.sink = sink
        self.pipe: Optional[tuple[int, int]] = None
        self.pending = 0
        self.count = 0
        self.eof = False
        self.done = False


@implementer(IReadWriteDescriptor)
class _End:
    """
    One socket as the reactor sees it: readable feeds its outgoing
    direction, writable drains its incoming one.
    """

    __slots__ = (
        "splicer", "sock", "fd", "name", "outgoing", "incoming", "reading", "writing", "grown"
    )
    # Set by the Splicer once both ends exist.
    outgoing: _Direction
    incoming: _Direction

    def __init__(self, splicer: "Splicer", sock: socket.socket, name: str) -> None:
        self.splicer = splicer
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.reading = False
        self.writing = False
        self.grown = False

    # Kept here so that the reactor is only asked when something changes.

    def read(self, wanted: bool) -> None:
        if wanted is not self.reading:
            self.reading = wanted
            reactor = self.splicer._reactor
            (reactor.addReader if wanted else reactor.removeReader)(self)

    def write(self, wanted: bool) -> None:
        if wanted is not self.writing:
            self.writing = wanted
            reactor = self.splicer._reactor
            (reactor.addWriter if wanted else reactor.removeWriter)(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "docker-router splice"

    # The reactor may call doWrite right after a doRead that ended the
    # relay, from the same poll: a stopped splicer does nothing.

    def doRead(self) -> None:
        if self.splicer._running:
            self.splicer._fill(self.outgoing)

    def doWrite(self) -> None:
        if self.splicer._running:
            self.splicer._drain(self.incoming)

    def connectionLost(self, reason: object) -> None:
        # The reactor saw a hang-up while we only waited to write: the peer
        # behind this socket is gone with bytes still owed to it.
        self.splicer._fail(self, "ConnectionLost")


class Splicer:
    """
    Relays two connected sockets until both directions have ended, or one
    side fails.

    @ivar toDocker: bytes taken from the client (and passed on).
    @ivar fromDocker: bytes taken from the daemon (and passed on).
    """

    def __init__(
        self,
        reactor: Any,
        pool: PipePool,
        client: socket.socket,
        daemon: socket.socket,
        ended: Callable[[Optional[str]], None],
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._ended = ended
        self._client = _End(self, client, "client")
        self._daemon = _End(self, daemon, "docker")
        self._up = _Direction(self._client, self._daemon)
        self._down = _Direction(self._daemon, self._client)
        self._client.outgoing = self._daemon.incoming = self._up
        self._daemon.outgoing = self._client.incoming = self._down
        self._running = False

    @property
    def toDocker(self) -> int:
        return self._up.count

    @property
    def fromDocker(self) -> int:
        return self._down.count

    def start(self) -> None:
        self._running = True
        self._client.read(True)
        self._daemon.read(True)
        # A client usually sends its request as soon as it has connected:
        # take it now rather than after another turn of the reactor.
        self._fill(self._up)

    def stop(self) -> None:
        """Stop relaying (without a word to C{ended}); the sockets stay open."""
        if not self._running:
            return
        self._running = False
        for end in (self._client, self._daemon):
            end.read(False)
            end.write(False)
        for direction in (self._up, self._down):
            if direction.pipe is not None:
                # It may hold bytes; never lend it again.
                _closePipe(direction.pipe)
                direction.pipe = None

    def close(self) -> None:
        """Stop, and close both sockets."""
        self.stop()
        self._client.sock.close()
        self._daemon.sock.close()

    def _fill(self, d: _Direction) -> None:
        if d.pipe is None:
            try:
                d.pipe = self._pool.take()
            except OSError as e:
                return self._fail(None, errno.errorcode.get(e.errno or 0, "OSError"))
        try:
            n = os.splice(d.source.fd, d.pipe[1], _CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return self._drain(d)
        except OSError as e:
            return self._fail(d.source, errno.errorcode.get(e.errno or 0, "OSError"))
        if n == 0:
            d.eof = True
            d.source.read(False)
        d.pending += n
        d.count += n
        self._drain(d)

    def _drain(self, d: _Direction) -> None:
        while d.pending:
            try:
                # Pending bytes are always in a pipe.
                d.pending -= os.splice(d.pipe[0], d.sink.fd, d.pending, flags=_SPLICE_FLAGS)  # type: ignore[index]
            except BlockingIOError:
                if not d.sink.grown:
                    # A bulk transfer: let the kernel queue more per call, as
                    # a C relay's larger buffers do; small exchanges never
                    # get here and pay nothing for it.
                    d.sink.grown = True
                    d.sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CHUNK)
                    continue
                # The sink is full: stop reading the source until it drains.
                d.source.read(False)
                d.sink.write(True)
                return
            except OSError as e:
                return self._fail(d.sink, errno.errorcode.get(e.errno or 0, "OSError"))
        d.sink.write(False)
        if d.pipe is not None:
            self._pool.give(d.pipe)
            d.pipe = None
        if d.eof:
            self._finish(d)
        elif self._running:
            d.source.read(True)

    def _finish(self, d: _Direction) -> None:
        """The source ended and everything reached the sink: half-close it."""
        if d.done:
            return
        d.done = True
        if self._up.done and self._down.done:
            # Both are about to be closed, which the peers see as EOF anyway.
            self.stop()
            self._ended(None)
            return
        try:
            d.sink.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the sink is already gone; its own direction will say so

    def _fail(self, end: Optional[_End], what: str) -> None:
        if not self._running:
            return
        self.stop()
        self._ended(f"{end.name}:{what}" if end else f"router:{what}")
