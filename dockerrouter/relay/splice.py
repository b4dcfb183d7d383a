"""
Moves a paired relay's bytes inside the kernel.

Copying through Python (C{recv}, C{dataReceived}, C{write}) costs the router
several times the CPU of a C relay.  Here each direction goes from one socket
into a pipe and from the pipe into the other socket with C{splice(2)}, so the
bytes never enter user space; the router still counts them, still passes an
end-of-file on as a half-close, and still pushes back: a direction reads its
source only while its pipe is empty, so a slow reader stalls the writer in
the kernel and the router holds at most one pipe per busy direction.

Pipes are lent from a bounded L{PipePool} while bytes are in flight and
given back when the direction is drained, so thousands of idle connections
hold none.  A direction that finds none to spare waits for one, unread, as
one over the byte budget stays small.  A direction whose sink is full hands
what its small pipe holds to the sink's own queue (see L{Splicer._push}) and
gives the pipe back, so that stalled readers hold no pipe: only bulk
transfers keep theirs while stalled, and they may have at most half the
pipes.

A hang-up or an error on the daemon's side while the client still sends
ends only that direction: the client's bytes can go nowhere, but the
daemon's last output may still be queued here, and it is relayed to its end
(see L{Splicer._cut}).  The client's going away ends the relay.

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
import resource
import socket
import struct
import termios
from typing import Any, Callable, Optional

from attrs import frozen
from twisted.internet.interfaces import IReadWriteDescriptor
from zope.interface import implementer

from dockerrouter.base._compat import handOverReading
from dockerrouter.relay.budget import Budget
from dockerrouter.relay.limits import pipesFor

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
    A bounded reserve of empty pipes to lend to directions with bytes in
    flight: default-sized ones for small reads, big ones for bulk transfers.

    At most C{limit} pipes are open at once (lent or idle), so the pipes'
    descriptors are a known share of the descriptor limit (see
    L{dockerrouter.relay.limits}).  A direction that finds none waits: it is
    handed the next pipe given back.  Big pipes are at most half of them,
    and only they stay lent while their direction is stalled (see
    L{Splicer._push}), so the other half is always there for directions
    that need one for a moment; a bulk transfer that finds no big pipe to
    spare takes a small one.
    """

    def __init__(self, limit: Optional[int] = None, size: int = BIG, keep: int = 16) -> None:
        """
        @param limit: by default, the share of the descriptor limit that
            L{pipesFor} gives.
        """
        if limit is None:
            limit = pipesFor(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.limit = limit
        self._size = size
        self._keep = keep
        self._idle: tuple[list[Pipe], list[Pipe]] = ([], [])
        # Pipes open, small and big: idle or lent.
        self.open = [0, 0]
        # Directions waiting for a pipe, in the order they asked.
        self._waiting: dict["_Direction", None] = {}

    @property
    def waiting(self) -> int:
        """How many directions wait for a pipe."""
        return len(self._waiting)

    def take(self, big: bool, waiter: "_Direction") -> Optional[Pipe]:
        """
        Lend a pipe (big if asked and one may be had); C{None} if there is
        none to spare, and then C{waiter} is handed the next one given back.

        @raise OSError: a new pipe could not be made.
        """
        if big and not self._idle[True] and self.open[True] >= self.limit // 2:
            big = False
        if self._idle[big]:
            return self._idle[big].pop()
        if sum(self.open) < self.limit:
            return self._make(big)
        if self._idle[not big]:
            return self._idle[not big].pop()
        self._waiting[waiter] = None
        return None

    def _make(self, big: bool) -> Pipe:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if big:
            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, self._size)
            except OSError:
                pass  # a smaller pipe only means more calls
        self.open[big] += 1
        return r, w, big

    def give(self, pipe: Pipe) -> None:
        """Take back a pipe; it must be empty.  The first waiter gets it."""
        if self._waiting:
            waiter = next(iter(self._waiting))
            del self._waiting[waiter]
            waiter.given(pipe)
            return
        idle = self._idle[pipe[2]]
        if len(idle) < self._keep:
            idle.append(pipe)
        else:
            self._close(pipe)

    def discard(self, pipe: Pipe) -> None:
        """
        Take back a pipe that may still hold bytes: it is closed, never lent
        again; a waiter gets a new one in its place.
        """
        self._close(pipe)
        if self._waiting:
            try:
                self.give(self._make(False))
            except OSError:
                pass  # the next pipe given back goes to the waiter

    def cancel(self, waiter: "_Direction") -> None:
        """C{waiter} needs no pipe any more (its relay ended, or the direction)."""
        self._waiting.pop(waiter, None)

    def _close(self, pipe: Pipe) -> None:
        _closePipe(pipe)
        self.open[pipe[2]] -= 1

    def close(self) -> None:
        for idle in self._idle:
            while idle:
                self._close(idle.pop())


def adoptedPipe(read: int, write: int) -> Pipe:
    """A pipe another process made (see L{Splicer.handOver}), as the pool lends them."""
    return read, write, fcntl.fcntl(write, _F_GETPIPE_SZ) >= BIG


def _closePipe(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


def queued(sock: socket.socket) -> int:
    """Bytes sent on C{sock} that its peer has not read yet (kernel's count)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def _room(d: "_Direction") -> int:
    """
    How much C{d} may splice into its sink now: what the sink's send
    buffer leaves free.  C{splice} into a Unix socket checks the buffer
    only when it starts a new packet, and a packet takes up to 17 pages:
    one call may queue 64 KiB into a socket whose C{send} would take 8
    (and Linux before 6.5, Debian 12's 6.1, adds to the last packet with no
    check at all), so a stalled reader would pin more than its budget.

    @raise BlockingIOError: when nothing, as a full socket would.
    """
    sock = d.sink.sock
    room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - queued(sock)
    if room <= 0:
        raise BlockingIOError(errno.EAGAIN, "the send buffer is full")
    return min(d.pending, room)


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

    def given(self, pipe: Pipe) -> None:
        """The L{PipePool} hands the pipe this direction waited for."""
        self.sink.splicer._given(self, pipe)


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
        # The reactor saw a hang-up (EPOLLHUP or EPOLLERR) while we only
        # waited to write (read-waiting, a Unix socket's hang-up comes with
        # EPOLLIN, and doRead reads what is left first): the peer behind this
        # socket is gone, with bytes still owed to it, and the reactor has
        # dropped this end.  What it sent before may still be queued here.
        self.reading = self.writing = False
        if self.splicer._running:
            self.splicer._sinkFailed(self.incoming, "ConnectionLost")


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
        # How a direction that was cut ended (see _cut): the relay's end.
        self._cutAs: Optional[str] = None

    @property
    def toDocker(self) -> int:
        """Bytes taken from the client, less any dropped by L{_cut}."""
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
            self._pool.cancel(direction)
            self._dropPipe(direction)
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
                d.pipe = self._pool.take(d.big, d)
            except OSError as e:
                return self._fail(None, errno.errorcode.get(e.errno or 0, "OSError"))
            if d.pipe is None:
                # None to spare: leave the bytes with the source until the
                # pool hands this direction one (see _given).
                d.source.read(False)
                return
        try:
            n = os.splice(d.source.fd, d.pipe[1], d.chunk, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return self._drain(d)
        except ConnectionResetError:
            if d.source is not self._daemon:
                return self._fail(d.source, "ECONNRESET")
            # The daemon closed with bytes of ours unread; the kernel says so
            # only once everything it sent has been read: its output ended.
            n = 0
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
                length = _room(d) if d.sized else d.pending
                d.pending -= os.splice(d.pipe[0], d.sink.fd, length, flags=_SPLICE_FLAGS)  # type: ignore[index]  # see above
            except BlockingIOError:
                if not d.big and self._grow(d):
                    continue
                # The sink is full: stop reading the source until it drains.
                d.source.read(False)
                d.sink.write(True)
                if not d.pipe[2] and self._push(d):  # type: ignore[index]  # see above
                    self._givePipe(d)
                return
            except OSError as e:
                return self._sinkFailed(d, errno.errorcode.get(e.errno or 0, "OSError"))
        if d.sink.writing:
            d.sink.write(False)
        if d.pipe is not None:
            self._givePipe(d)
        if d.eof:
            self._finish(d)
        elif self._running and not d.source.reading:
            d.source.read(True)

    def _push(self, d: _Direction) -> bool:
        """
        The sink is full with bytes still in a small pipe: let the sink's
        queue take them all, by raising its send buffer for this one call,
        so that the pipe can go back to the pool.  The bytes are the same
        ones (a small read at most), waiting in the socket instead of the
        pipe; the send buffer is small again at once, so the source is read
        again only once the peer has read them, as before.  Say whether
        every byte went.
        """
        sock = d.sink.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, queued(sock) + d.pending + SMALL)
            try:
                while d.pending:
                    d.pending -= os.splice(d.pipe[0], d.sink.fd, d.pending, flags=_SPLICE_FLAGS)  # type: ignore[index]  # a full sink's direction has a pipe
            finally:
                d.sized = True
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG if d.big else SMALL_SNDBUF)
        except OSError:
            return False  # kept in the pipe; a failed sink says so on its next write
        return True

    def _givePipe(self, d: _Direction) -> None:
        """Give back C{d}'s empty pipe (the pool may hand it on at once)."""
        pipe, d.pipe = d.pipe, None
        assert pipe is not None and not d.pending
        self._pool.give(pipe)

    def _dropPipe(self, d: _Direction) -> None:
        """Give back C{d}'s pipe, if any; one with bytes in it is closed."""
        if d.pipe is None:
            return
        if d.pending:
            pipe, d.pipe = d.pipe, None
            d.pending = 0
            self._pool.discard(pipe)
        else:
            self._givePipe(d)

    def _given(self, d: _Direction, pipe: Pipe) -> None:
        """The pipe C{d} waited for: read its source again."""
        d.pipe = pipe
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
            self._ended(self._cutAs)
            return
        try:
            d.sink.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the sink is already gone; its own direction will say so

    def _sinkFailed(self, d: _Direction, what: str) -> None:
        """
        C{d}'s sink hung up or failed: the daemon's going ends only the
        client's direction (L{_cut}); the client's, the relay.
        """
        if d.sink is self._daemon:
            self._cut(d, what)
        else:
            self._fail(d.sink, what)

    def _cut(self, d: _Direction, what: str) -> None:
        """
        The daemon reads no more (it closed, or shut its reading) while the
        client still sends: end that direction alone.  What it held is
        dropped (and uncounted), the client's further sends fail (we shut our
        reading, which the kernel passes on as EPIPE to the client's
        writing, as the daemon's own socket would have), and the daemon's
        output, which may still be queued here, is relayed to its end.
        """
        if not self._running or d.done:
            return
        if self._cutAs is None:
            self._cutAs = f"{d.sink.name}:{what}"
        self._pool.cancel(d)
        d.source.read(False)
        d.sink.write(False)
        d.count -= d.pending
        self._dropPipe(d)
        try:
            d.source.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # the client is gone too: its own direction will say so
        d.eof = True
        other = d.sink.outgoing
        if not (other.pending or other.eof or other.pipe or other.source.reading):
            # The reactor dropped the daemon's end on the hang-up: read
            # what it left (its hang-up reads as EOF after that).
            other.source.read(True)
        self._finish(d)

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
