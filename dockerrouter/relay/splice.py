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

What a direction may hold in flight is small (a small read into a small
pipe, a small send buffer on its sink) unless the L{Budget} lends it the
big pipe and the grown send buffer of a bulk transfer; see L{budget}.  The
sink's send buffer is made small before a direction's second read: until
then it holds no more than one small read, and a short exchange (most of
Docker's API) costs no C{setsockopt} at all.
"""

import errno
import fcntl
import os
import socket
import struct
import termios
from typing import Any, Callable, Optional

from attrs import frozen
from twisted.internet.interfaces import IReadWriteDescriptor
from zope.interface import implementer

from dockerrouter.base._compat import handOverReading
from dockerrouter.relay.budget import Budget

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

# A bulk transfer's read into its (big) pipe, and its sink's send buffer.
BIG = 1024 * 1024
# Every other direction's read into its (default, 64 KiB) pipe, and every
# socket's send buffer until then: what one stalled direction may hold
# without a grant, so that the connection caps bound it.
SMALL = 16 * 1024
SMALL_SNDBUF = 4 * 1024
# What a grant lets a direction hold beyond that; the kernel doubles the
# SO_SNDBUF it is given.
GRANT = (BIG - SMALL) + 2 * (BIG - SMALL_SNDBUF)

# A pipe: read end, write end, and whether it is big.
Pipe = tuple[int, int, bool]


class PipePool:
    """
    Empty pipes to lend to directions with bytes in flight: default-sized
    ones for small reads, big ones for bulk transfers.
    """

    def __init__(self, size: int = BIG, keep: int = 16) -> None:
        self._size = size
        self._keep = keep
        self._idle: tuple[list[Pipe], list[Pipe]] = ([], [])

    def take(self, big: bool) -> Pipe:
        idle = self._idle[big]
        if idle:
            return idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if big:
            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, self._size)
            except OSError:
                pass  # a smaller pipe only means more calls
        return r, w, big

    def give(self, pipe: Pipe) -> None:
        """Take back a pipe; it must be empty."""
        idle = self._idle[pipe[2]]
        if len(idle) < self._keep:
            idle.append(pipe)
        else:
            _closePipe(pipe)

    def close(self) -> None:
        for idle in self._idle:
            while idle:
                _closePipe(idle.pop())


def adoptedPipe(read: int, write: int) -> Pipe:
    """A pipe another process made (see L{Splicer.handOver}), as the pool lends them."""
    return read, write, fcntl.fcntl(write, _F_GETPIPE_SZ) >= BIG


def _closePipe(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


def queued(sock: socket.socket) -> int:
    """Bytes sent on C{sock} that its peer has not read yet (kernel's count)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class _Direction:
    """
    Bytes from C{source} to C{sink}, and what is in flight between them.

    @ivar big: whether it holds a grant of the L{Budget} (a big pipe, a grown
        send buffer on the sink).
    @ivar chunk: how much one read from the source may take.
    @ivar swept: C{count} when the budget last looked.
    @ivar sized: whether the sink's send buffer has been set (small or big).
    """

    __slots__ = ("source", "sink", "pipe", "pending", "count", "eof", "done", "big", "chunk", "swept", "sized")

    def __init__(self, source: "_End", sink: "_End") -> None:
        self.source = source
        self.sink = sink
        self.pipe: Optional[Pipe] = None
        self.pending = 0
        self.count = 0
        self.eof = False
        self.done = False
        self.big = False
        self.chunk = SMALL
        self.swept = -1
        self.sized = False

    def sweep(self) -> None:
        """The budget's look, about once a second: give the grant back if quiet."""
        if self.count == self.swept and not self.pending:
            self.sink.splicer._shrink(self)
        self.swept = self.count


@frozen
class Progress:
    """
    How far one direction got: bytes taken from its source, whether the
    source has ended (C{eof}), and whether that end has been passed on to
    the sink (C{done}); C{big}: it held a grant of the L{Budget}.
    """

    count: int = 0
    eof: bool = False
    done: bool = False
    big: bool = False


@frozen
class Handed:
    """
    A stopped relay as another process may resume it (L{Splicer.resume}):
    its two sockets, each direction's progress, and each direction's pipe
    while it still holds bytes (read end, write end), or C{None}.
    """

    client: socket.socket
    daemon: socket.socket
    up: Progress
    down: Progress
    upPipe: Optional[tuple[int, int]]
    downPipe: Optional[tuple[int, int]]


@implementer(IReadWriteDescriptor)
class _End:
    """
    One socket as the reactor sees it: readable feeds its outgoing
    direction, writable drains its incoming one.
    """

    __slots__ = ("splicer", "sock", "fd", "fileno", "name", "outgoing", "incoming", "reading", "writing")
    # Set by the Splicer once both ends exist.
    outgoing: _Direction
    incoming: _Direction

    def __init__(self, splicer: "Splicer", sock: socket.socket, name: str) -> None:
        self.splicer = splicer
        self.sock = sock
        self.fd = sock.fileno()
        # What the reactor asks for every event: the socket's own method, not
        # a Python one.
        self.fileno = sock.fileno
        self.name = name
        self.reading = False
        self.writing = False

    # Kept here so that the reactor is only asked when something changes
    # (the busiest callers look first, sparing a call per chunk).

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
        budget: Budget,
        uid: int,
    ) -> None:
        """
        @param budget: lends big pipes and buffers to bulk transfers.
        @param uid: the user whose share of C{budget} this relay draws on.
        """
        self._reactor = reactor
        self._pool = pool
        self._budget = budget
        self._uid = uid
        self._ended = ended
        self._client = _End(self, client, "client")
        self._daemon = _End(self, daemon, "docker")
        self._up = _Direction(self._client, self._daemon)
        self._down = _Direction(self._daemon, self._client)
        self._client.outgoing = self._daemon.incoming = self._up
        self._daemon.outgoing = self._client.incoming = self._down
        self._running = False
        self._closed = False

    @property
    def toDocker(self) -> int:
        return self._up.count

    @property
    def fromDocker(self) -> int:
        return self._down.count

    def start(self, transport: Any = None) -> None:
        """
        @param transport: the Twisted transport that carried the client's
            socket until now, if any: the reactor's reading of the socket
            passes from it to the splicer (see L{handOverReading}).
        """
        self._running = True
        if transport is not None:
            handOverReading(self._reactor, transport, self._client)
            self._client.reading = True
        else:
            self._client.read(True)
        self._daemon.read(True)
        # A client usually sends its request as soon as it has connected:
        # take it now rather than after another turn of the reactor.
        self._fill(self._up)

    def handOver(self) -> Handed:
        """
        Stop relaying (without a word to C{ended}) and give up everything
        this relay holds, closing nothing: bytes already in a pipe stay
        there, so another process that resumes it from the same sockets
        and pipes loses, repeats and reorders nothing.
        """
        self._running = False
        for end in (self._client, self._daemon):
            end.read(False)
            end.write(False)
        directions = []
        for d in (self._up, self._down):
            pipe = None
            if d.pipe is not None:
                if d.pending:
                    pipe = d.pipe[:2]
                else:
                    self._pool.give(d.pipe)
                d.pipe = None
                d.pending = 0
            directions.append((Progress(d.count, d.eof, d.done, d.big), pipe))
            if d.big:
                # The grant goes with the relay; the sink keeps its buffer.
                self._release(d)
        self._closed = True
        self._forget()
        (up, upPipe), (down, downPipe) = directions
        return Handed(self._client.sock, self._daemon.sock, up, down, upPipe, downPipe)

    def resume(self, up: Progress, down: Progress, upPipe: Optional[Pipe], downPipe: Optional[Pipe]) -> None:
        """
        Go on relaying from where another process stopped (see
        L{handOver}): what its pipes hold is passed on first.
        """
        self._running = True
        for d, progress, pipe in ((self._up, up, upPipe), (self._down, down, downPipe)):
            d.count, d.eof, d.done, d.sized = progress.count, progress.eof, progress.done, True
            if pipe is not None:
                d.pipe = pipe
                d.pending = struct.unpack("i", fcntl.ioctl(pipe[0], termios.FIONREAD, b"\0\0\0\0"))[0]
            if progress.big:
                self._grow(d)
        for d in (self._up, self._down):
            if self._running and not d.done:
                self._drain(d)

    def stop(self) -> None:
        """Stop relaying (without a word to C{ended}); the sockets stay open."""
        if not self._running:
            return
        self._running = False
        for end in (self._client, self._daemon):
            if end.reading:
                end.read(False)
            if end.writing:
                end.write(False)
        for direction in (self._up, self._down):
            if direction.pipe is not None:
                # It may hold bytes; never lend it again.
                _closePipe(direction.pipe)
                direction.pipe = None
                direction.pending = 0
            if direction.big:
                self._shrink(direction)

    def close(self) -> None:
        """
        Stop, and close both sockets; but a socket whose peer has yet to
        read what a grown buffer let the router queue keeps it (and the
        grant) until then: closing would leave those bytes in the peer's
        queue, still the router's, and no longer counted.
        """
        if self._closed:
            return
        self.stop()
        self._closed = True
        held = False
        for end in (self._client, self._daemon):
            if end.incoming.big:
                held = True
            else:
                end.sock.close()
        if not held:
            self._forget()

    def _forget(self) -> None:
        """
        Nothing can reach this relay any more (the reactor has let go of its
        ends, the budget of its directions): cut its reference cycles, so
        that it is freed at once rather than left to the cyclic garbage
        collector, whose passes grow with every connection left to them.
        Counts stay readable.
        """
        self._ended = _ignore
        for end in (self._client, self._daemon):
            # The reactor may still call an end from the poll that ended the
            # relay (see doWrite): it finds a stopped splicer.
            end.splicer = _STOPPED
            end.outgoing = end.incoming = None  # type: ignore[assignment]  # stopped: no direction is used again

    def _fill(self, d: _Direction) -> None:
        if d.pipe is None:
            try:
                d.pipe = self._pool.take(d.big)
            except OSError as e:
                return self._fail(None, errno.errorcode.get(e.errno or 0, "OSError"))
        try:
            n = os.splice(d.source.fd, d.pipe[1], d.chunk, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return self._drain(d)
        except OSError as e:
            return self._fail(d.source, errno.errorcode.get(e.errno or 0, "OSError"))
        if n == 0:
            d.eof = True
            d.source.read(False)
        else:
            if not d.sized and d.count:
                # A second read: the first is all the sink's default
                # buffer may hold.
                d.sized = True
                d.sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
            if n == d.chunk and not d.big:
                # The source had more than a small read: a bulk transfer.
                self._grow(d)
        d.pending += n
        d.count += n
        self._drain(d)

    def _drain(self, d: _Direction) -> None:
        while d.pending:
            try:
                # Pending bytes are always in a pipe.
                d.pending -= os.splice(d.pipe[0], d.sink.fd, d.pending, flags=_SPLICE_FLAGS)  # type: ignore[index]  # see above
            except BlockingIOError:
                if not d.big and self._grow(d):
                    continue
                # The sink is full: stop reading the source until it drains.
                d.source.read(False)
                d.sink.write(True)
                return
            except OSError as e:
                return self._fail(d.sink, errno.errorcode.get(e.errno or 0, "OSError"))
        if d.sink.writing:
            d.sink.write(False)
        if d.pipe is not None:
            self._pool.give(d.pipe)
            d.pipe = None
        if d.eof:
            self._finish(d)
        elif self._running and not d.source.reading:
            d.source.read(True)

    def _grow(self, d: _Direction) -> bool:
        """
        A bulk transfer: let the kernel queue more per call, as a C relay's
        larger buffers do, if the budget lends it; small exchanges never
        get here.
        """
        if not self._budget.take(d, self._uid, GRANT):
            return False
        d.big = True
        d.chunk = BIG
        d.swept = -1
        d.sized = True
        d.sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG)
        return True

    def _shrink(self, d: _Direction) -> None:
        """
        A quiet bulk transfer goes back to small, once its peer has read
        what the grown buffer let the router queue (until then it is still
        held, so it is still charged).
        """
        try:
            if queued(d.sink.sock) > SMALL + 2 * SMALL_SNDBUF:
                return  # more than a small direction may leave there
            d.sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
        except OSError:
            pass  # the sink is gone: its relay is ending
        self._release(d)
        if self._closed:
            d.sink.sock.close()
            if not (self._up.big or self._down.big):
                self._forget()  # the last kept socket: nothing refers back now

    def _release(self, d: _Direction) -> None:
        d.big = False
        d.chunk = SMALL
        self._budget.give(d, self._uid, GRANT)

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


def _ignore(failure: Optional[str]) -> None:
    pass


# What the ends of a forgotten splicer point at: one that never runs.
_STOPPED = Splicer.__new__(Splicer)
_STOPPED._running = False
