"""
The blocking part of reaching a daemon, run in a worker (it looks at a path
the user chose): open what the path leads to (C{O_PATH}), check the file,
connect through the descriptor, read the daemon's credentials (L{reach}),
and the on-demand starter's probe (L{answers}).
"""

import os
import socket
from typing import Callable, Optional, Sequence

from attrs import define

from dockerrouter.routing.credentials import Credentials, peerCredentials
from dockerrouter.routing.reasons import BackendUnusable, checkSocketFile, explainConnectFailure
from dockerrouter.routing.route import Backend


def openSocketFile(path: str) -> tuple[int, os.stat_result]:
    """
    Open what C{path} leads to (following links) without opening the file
    itself (C{O_PATH}), and C{fstat} it: the descriptor pins the file that
    was looked at, so that the connect reaches it and nothing else.
    """
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def connectUnix(path: str) -> socket.socket:
    """
    Connect a non-blocking Unix stream socket to C{path}.

    A Unix connect never waits: it succeeds at once, or fails at once,
    with C{BlockingIOError} (EAGAIN) when the listener's backlog is full.
    So this is done here rather than through Twisted's connector, which
    would cost a transport per relay and reports EAGAIN as a hang-up.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def answers(backend: Backend) -> bool:
    """
    Whether a daemon accepts at C{backend}'s path now, on a socket of the
    uid it must run as (checked first: root knocks on nothing else).  The
    on-demand starter's question while a daemon is starting (in a worker:
    it looks at a path the user chose).
    """
    reached = reach(backend, openSocketFile, connectUnix)
    if reached.daemon is not None:
        reached.daemon.close()
    return reached.full or reached.daemon is not None


def anyAnswers(candidates: Sequence[Backend]) -> bool:
    """Whether a daemon answers at any of C{candidates} (see L{answers})."""
    return any(answers(candidate) for candidate in candidates)


@define
class Reached:
    """
    What one attempt met at a candidate's path (see L{reach}): a connected
    daemon and its credentials, or a full backlog, or the reason why not.

    @ivar target: the file the path led to, when it could be opened.
    """

    target: Optional[os.stat_result] = None
    daemon: Optional[socket.socket] = None
    credentials: Optional[Credentials] = None
    full: bool = False
    reason: Optional[BackendUnusable] = None

    def close(self) -> None:
        """Let go of a daemon nobody wants any more (the client left)."""
        if self.daemon is not None:
            self.daemon.close()


def reach(
    backend: Backend,
    open: Callable[[str], tuple[int, os.stat_result]],
    connect: Callable[[str], socket.socket],
) -> Reached:
    """
    The blocking part of one attempt, made in a worker: everything that
    looks at the path the user chose.  Open what the path leads to
    (C{open}: L{openSocketFile}), check it, connect through the
    descriptor (C{connect}: L{connectUnix}), so that what was checked is
    what is connected, and read the daemon's credentials.  Whether that
    daemon may be used is the caller's to decide (L{verifyDaemon}).
    """
    try:
        fd, target = open(backend.path)
    except OSError as e:
        return Reached(reason=explainConnectFailure(backend, e))
    try:
        checkSocketFile(backend, target)
        daemon = connect(f"/proc/self/fd/{fd}")
    except BackendUnusable as reason:
        return Reached(target, reason=reason)
    except BlockingIOError:
        return Reached(target, full=True)
    except OSError as e:
        return Reached(target, reason=explainConnectFailure(backend, e))
    finally:
        os.close(fd)
    try:
        credentials = peerCredentials(daemon)
    except OSError as e:
        daemon.close()
        return Reached(target, reason=explainConnectFailure(backend, e))
    return Reached(target, daemon, credentials)
