"""
File descriptors: how many the router may have, and what it does when it
runs out.

Every relay holds two sockets (and a pipe pair per direction while bytes are
in flight), so the descriptor limit is the router's real capacity.
"""

import errno
import os
import resource
import socket
from typing import Callable

from twisted.internet.interfaces import IReactorTime

from dockerrouter._compat import replaceListeningSocket
from dockerrouter.logging import RouterLogger

# Descriptors kept back from the connection cap: the listening sockets, the
# reactor, logging, the idle pipe pool and a backend connect in progress.
_RESERVED = 100


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


def connectionsFor(descriptorLimit: int) -> int:
    """How many connections fit in C{descriptorLimit} descriptors."""
    return max(1, (descriptorLimit - _RESERVED) // 2)


class _GuardedListener:
    """
    Stands in for a port's listening socket: when C{accept} fails for want
    of descriptors it reports it and then looks, to the port, like a socket
    with nothing more to accept.
    """

    def __init__(self, sock: socket.socket, exhausted: Callable[[int], None]) -> None:
        self._sock = sock
        self._exhausted = exhausted

    def accept(self):
        try:
            return self._sock.accept()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._exhausted(e.errno)
            raise BlockingIOError(errno.EAGAIN, "accepting paused")

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class AcceptBackoff:
    """
    When a port can't accept for want of descriptors, stop accepting for
    C{interval} seconds instead of spinning on a backlog it can't take
    (Twisted's port would retry at once, logging each time), warn once, and
    resume by itself.  Live connections are served meanwhile, and the
    waiting clients stay in the listen backlog.
    """

    log = RouterLogger()

    def __init__(self, reactor: IReactorTime, port, interval: float = 0.5) -> None:
        self._reactor = reactor
        self._port = port
        self.interval = interval
        self._paused = False
        replaceListeningSocket(port, lambda sock: _GuardedListener(sock, self._exhausted))

    def _exhausted(self, number: int) -> None:
        if self._paused:
            return
        self._paused = True
        self._port.stopReading()
        self.log.warn(
            "out of file descriptors ({error}, limit {limit}): not accepting "
            "for {interval}s on {port}",
            error=errno.errorcode[number],
            limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            interval=self.interval,
            port=os.fsdecode(self._port.getHost().name),
        )
        self._reactor.callLater(self.interval, self._resume)

    def _resume(self) -> None:
        self._paused = False
        if self._port.connected:
            self._port.startReading()
