"""
File descriptors: how many the router may have, and what it does when it
runs out.

Every relay holds two sockets, and every client being turned away holds its
socket while it is answered, so the descriptor limit is the router's real
capacity.  Pipes (two descriptors each) are lent to directions only while
bytes move, from a reserve of their own (L{pipesFor}); the connection cap
is what is left, two descriptors a connection (L{connectionsFor}).  This
module is the one place that shares the limit out.
"""

import errno
import os
import resource
import socket
from typing import Any

from twisted.internet.interfaces import IReactorTime

from dockerrouter.base._compat import rawAccept, replaceListeningSocket
from dockerrouter.base.logging import RouterLogger

# Descriptors kept back from connections and pipes: the listening sockets,
# the reactor, logging, metrics and control, and a backend connect in
# progress.
_RESERVED = 100

# What one relay holds for as long as it lives: its two sockets.
_PER_CONNECTION = 2

# One pipe in the reserve for this many connections: a stalled direction
# gives its small pipe back (it pushes the bytes into its sink's queue), so
# pipes are held across turns of the reactor only by stalled bulk
# transfers, at most half of them; the rest is for directions that move
# bytes right now.
_CONNECTIONS_PER_PIPE = 200

# Never fewer pipes than this, however low the limit.
_MIN_PIPES = 8


def raiseDescriptorLimit() -> tuple[int, int]:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit.

    @return: the soft limit before and after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            hard = int(f.read())
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard
    return soft, soft


def pipesFor(descriptorLimit: int) -> int:
    """How many pipes the reserve holds at most, under C{descriptorLimit}."""
    shared = max(0, descriptorLimit - _RESERVED)
    return max(_MIN_PIPES, shared // (_CONNECTIONS_PER_PIPE * _PER_CONNECTION + 2))


def connectionsFor(descriptorLimit: int) -> int:
    """
    How many connections fit in C{descriptorLimit} descriptors, besides the
    reserved ones and the pipes' (L{pipesFor}).
    """
    pipes = 2 * pipesFor(descriptorLimit)
    return max(1, (descriptorLimit - _RESERVED - pipes) // _PER_CONNECTION)


# Descriptors an accepted client may still need once admitted: the O_PATH
# look at its daemon's socket file, the socket to the daemon, and a pipe for
# each direction.  Accepting pauses while fewer than these are left, so
# that clients turned away over a cap (each holds its socket while it is
# answered) can't leave an admitted one unable to reach its daemon.
HEADROOM = 32


class _GuardedListener:
    """
    Stands in for a port's listening socket: when C{accept} fails for want
    of descriptors, or hands out one of the last L{HEADROOM}, it reports it
    and then, while paused, looks to the port like a socket with nothing
    more to accept.
    """

    def __init__(self, sock: socket.socket, backoff: "AcceptBackoff", ceiling: int) -> None:
        self._sock = sock
        self._backoff = backoff
        self._ceiling = ceiling
        # What socket.accept reads from the listening socket for every
        # client, each time through an enum conversion.
        self._kind = (sock.family, sock.type, sock.proto)

    def accept(self) -> tuple[socket.socket, Any]:
        if self._backoff.paused:
            raise BlockingIOError(errno.EAGAIN, "accepting paused")
        try:
            # socket.accept, less its per-call lookups (the listening socket
            # is non-blocking, so the accepted one is left as it comes).
            fd, address = rawAccept(self._sock)
            client = socket.socket(*self._kind, fileno=fd)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._backoff.exhausted(errno.errorcode[e.errno])
            raise BlockingIOError(errno.EAGAIN, "accepting paused")
        # The kernel hands out the lowest free descriptor: one this high
        # means every one below it is taken.
        if client.fileno() >= self._ceiling:
            self._backoff.exhausted(f"fewer than {HEADROOM} left")
        return client, address

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class AcceptBackoff:
    """
    When a port can't accept for want of descriptors (or is about to run
    out), stop accepting for C{interval} seconds instead of spinning on a
    backlog it can't take (Twisted's port would retry at once, logging each
    time), warn once, and resume by itself.  Live connections are served
    meanwhile, and the waiting clients stay in the listen backlog.
    """

    log = RouterLogger()

    def __init__(self, reactor: IReactorTime, port: Any, interval: float = 0.5) -> None:
        self._reactor = reactor
        self._port = port
        self.interval = interval
        self.paused = False
        ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - HEADROOM
        replaceListeningSocket(port, lambda sock: _GuardedListener(sock, self, ceiling))

    def exhausted(self, why: str) -> None:
        """Stop accepting for a while, and say so once."""
        if self.paused:
            return
        self.paused = True
        self._port.stopReading()
        self.log.warn(
            "out of file descriptors ({error}, limit {limit}): not accepting "
            "for {interval}s on {port}",
            error=why,
            limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            interval=self.interval,
            port=os.fsdecode(self._port.getHost().name),
        )
        self._reactor.callLater(self.interval, self._resume)

    def _resume(self) -> None:
        self.paused = False
        if self._port.connected:
            self._port.startReading()
