"""
One client connection: who it is, the daemon it may reach, and the relay
between them.

The L{ServerProtocol} owns the connection from start to end: it reads the
client's credentials, holds the client's bytes in the kernel until there is
somewhere to send them, connects to the backend, verifies the daemon it
reached, and only then hands both sockets to a L{Splicer}, which moves the
bytes inside the kernel.  When the backend can't be used, an
L{ErrorResponder} answers instead.  Where the backend is and what makes it
acceptable is the resolver's and C{verifyDaemon}'s business; this module
knows neither paths nor users.
"""

import os
import socket
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Optional, Set, cast

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dockerrouter.backends import (
    Backend,
    BackendResolver,
    BackendUnusable,
    ConnectTimeout,
    Judged,
    LookupFailed,
    NoneWorked,
    Route,
    TooManyForUser,
    TooManyInTotal,
    checkSocketFile,
    explainConnectFailure,
    forTheUser,
    verifyDaemon,
)
from dockerrouter.config import Settings
from dockerrouter.credentials import Credentials, peerCredentials, peerGroups
from dockerrouter.errors import ErrorResponder
from dockerrouter.budget import Budget
from dockerrouter.logging import ConnectionRecords, RejectionLog, RouterLogger
from dockerrouter.routing import NeedLookup
from dockerrouter.splice import PipePool, Splicer
from dockerrouter.visibility import Viewer, look

if TYPE_CHECKING:
    from dockerrouter.metrics import Buckets

# How soon to try again a daemon whose listen backlog is full.
_RETRY_DELAY = 0.05

# What sends a connection on to the next socket of its chain: nothing usable
# is there.  Anything else (a daemon of the wrong uid, a loop back to the
# router, a hung daemon) is an attack or a mistake, and is refused at once.
_NEXT_CANDIDATE = frozenset({"missing", "refused", "not-a-socket"})


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


class SocketFiles:
    """
    The socket files backend paths lead to, kept open (C{O_PATH}) for the
    next connection: while a path still leads to the same file (one
    C{stat} says so), its descriptor is used again, rather than a look
    that opens, checks and closes one per connection.  What is connected
    is still the file the path leads to when the connection is made, and
    its owner and type are checked anew from that C{stat}.

    At most C{most} are kept (the descriptor reserve of L{limits} has
    room for them); a path that leads elsewhere, or nowhere, gives its
    descriptor up.
    """

    def __init__(self, open: Callable[[str], tuple[int, os.stat_result]], most: int = 16) -> None:
        """@param open: what opens a path anew (L{openSocketFile})."""
        self._open = open
        self._most = most
        # path -> (descriptor, the device and inode it was opened on)
        self._kept: "OrderedDict[str, tuple[int, tuple[int, int]]]" = OrderedDict()

    def open(self, path: str) -> tuple[int, os.stat_result]:
        """
        A descriptor of what C{path} leads to (this object's: not to be
        closed), and its C{stat}.

        @raise OSError: as L{openSocketFile}.
        """
        kept = self._kept.get(path)
        if kept is not None:
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == kept[1]:
                self._kept.move_to_end(path)
                return kept[0], now
            self._forget(path)
        fd, target = self._open(path)
        self._kept[path] = (fd, (target.st_dev, target.st_ino))
        if len(self._kept) > self._most:
            self._forget(next(iter(self._kept)))
        return fd, target

    def _forget(self, path: str) -> None:
        os.close(self._kept.pop(path)[0])

    def close(self) -> None:
        while self._kept:
            self._forget(next(iter(self._kept)))


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
    on-demand starter's question while a daemon is starting.
    """
    try:
        fd, target = openSocketFile(backend.path)
    except OSError:
        return False
    try:
        checkSocketFile(backend, target)
        connectUnix(f"/proc/self/fd/{fd}").close()
    except BlockingIOError:
        return True  # listening, with a full backlog
    except (OSError, BackendUnusable):
        return False
    finally:
        os.close(fd)
    return True


@implementer(IHalfCloseableProtocol)
class ServerProtocol(Protocol):
    """
    The client's connection to the router, and the owner of the relay.

    Twisted's transport carries the connection until it is relayed (and a
    rejected one to its end); a relayed one belongs to the L{Splicer}, and
    the transport is let go.  The transport never reads a relayed
    connection: the reactor can't call it while C{connectionMade} runs, and
    a connection that has to wait (for a name, for room in the daemon's
    backlog) is paused first.
    """

    log = RouterLogger()
    factory: "RouterFactory"
    # A Unix server connection (getHandle, pauseProducing, abortConnection)
    # until relayed, then None: more than Protocol's Optional[ITransport].
    transport: Any

    client: Credentials
    judged: Judged
    # The candidate being tried, then the one relayed to.
    backend: Backend
    route: Optional[Route] = None
    ended: Optional[str] = None
    _lost = False
    # The file the backend path led to, when it could be opened.
    _target: Optional[os.stat_result] = None
    _splicer: Optional[Splicer] = None
    _retry: Optional[IDelayedCall] = None
    _responder: Optional[ErrorResponder] = None
    _recorded = False
    # The on-demand start this connection waits on (once per connection).
    _starting: Optional[Deferred] = None
    _startTried = False

    def connectionMade(self) -> None:
        self.startedAt = self.factory.reactor.seconds()
        handle = self.transport.getHandle()
        self.client = peerCredentials(handle)
        # Read once: a reload gives later connections other settings.
        self.settings = self.factory.settings
        # Judged now, once: a pid looked at after a wait may be another's.
        self.judged = self.settings.resolver.judge(self.client, handle)
        self._route()

    def _route(self, _: object = None) -> None:
        """
        Find the client's chain, admit it and connect; while a name is
        looked up (off the reactor thread), the connection waits here
        without holding anyone else, and comes back when it is known.
        """
        if self._lost:
            return
        try:
            route = self.settings.resolver.resolve(self.client, self.judged)
        except NeedLookup as waiting:
            self._wait()
            # A user database that doesn't answer holds the client no longer
            # than a daemon that doesn't accept would.
            waiting.deferred.addTimeout(self.settings.connectTimeout, self.factory.reactor)
            waiting.deferred.addCallbacks(self._route, self._lookupFailed)
            return
        except BackendUnusable as reason:
            self.backend = reason.backend
            self._reject(reason)
            return
        self.route = route
        self.backend = route.candidates[0]
        self._tried: list[BackendUnusable] = []
        try:
            self.factory.admit(self)
        except BackendUnusable as reason:
            self._reject(reason)
            return
        self._connectFrom = self.factory.reactor.seconds()
        self._connectBy = self._connectFrom + self.settings.connectTimeout
        self._connect()

    def _wait(self) -> None:
        """
        Don't read while the connection waits: the kernel keeps the
        client's first bytes until there is somewhere to send them.
        """
        self.transport.pauseProducing()

    def _lookupFailed(self, failure: Failure) -> None:
        if self._lost:
            return
        self.log.failure("user database lookup for uid {uid}", failure, uid=self.client.uid)
        self.backend = Backend("-", self.client.uid, str(self.client.uid))
        self._reject(LookupFailed(self.backend, failure.getErrorMessage()))

    def _connect(self) -> None:
        self._retry = None
        self._target = None
        try:
            fd, self._target = self.factory.socketFiles.open(self.backend.path)
        except OSError as e:
            self._failed(explainConnectFailure(self.backend, e))
            return
        try:
            checkSocketFile(self.backend, self._target)
            # Through the descriptor: what was checked is what is connected.
            daemon = self.factory.connectUnix(f"/proc/self/fd/{fd}")
        except BackendUnusable as reason:
            self._failed(reason)
            return
        except BlockingIOError:
            # The daemon's listen backlog is full: wait for room, as a
            # blocking connect would, up to the connect timeout.
            if self.factory.reactor.seconds() < self._connectBy:
                self._wait()
                self._retry = self.factory.reactor.callLater(_RETRY_DELAY, self._connect)
            else:
                self._reject(ConnectTimeout(self.backend, f"{self.settings.connectTimeout:g}"))
            return
        except OSError as e:
            self._failed(explainConnectFailure(self.backend, e))
            return
        try:
            verifyDaemon(self.backend, peerCredentials(daemon), self.factory.routerPid())
        except BackendUnusable as reason:
            daemon.close()
            self._reject(reason)
            return
        except OSError as e:
            daemon.close()
            self._reject(explainConnectFailure(self.backend, e))
            return
        self._splicer = Splicer(
            self.factory.reactor,
            self.factory.pipes,
            self.transport.getHandle(),
            daemon,
            self._relayEnded,
            self.factory.budget,
            self.backend.uid,
        )
        transport, self.transport = self.transport, None
        self._splicer.start(transport)
        self.factory.relayed(self.factory.reactor.seconds() - self._connectFrom, self.backend.template)

    def _failed(self, reason: BackendUnusable) -> None:
        """
        The candidate can't be used: try the next one when nothing usable
        was there, else refuse at once (never fall through past a daemon
        of the wrong uid).
        """
        assert self.route is not None
        if reason.cause not in _NEXT_CANDIDATE:
            self._reject(reason)
            return
        candidates = self.route.candidates
        if len(candidates) == 1:
            self._noneWorked(reason)
            return
        self._tried.append(self._forTheUser(reason))
        if len(self._tried) < len(candidates):
            self.backend = candidates[len(self._tried)]
            self._connect()
        else:
            self._noneWorked(NoneWorked(candidates[0], self._tried))

    def _noneWorked(self, reason: BackendUnusable) -> None:
        """
        Every candidate is missing, refuses or is not a socket: C{reason}
        says so (for a chain, L{NoneWorked} lists them).  With C{--start},
        and a chain to the user's own daemon, ask for it to be started
        (once) and try the chain again when the start is done.
        """
        assert self.route is not None
        candidates = self.route.candidates
        starter = self.factory.starter
        if (
            starter is None
            or self.settings.start is None
            or self._startTried
            or candidates[0].owner != candidates[0].uid
        ):
            self._reject(reason)
            return
        self._startTried = True
        self._wait()
        # It may fire at once: kept only while it waits.
        self._starting = starting = starter.start(
            candidates[0],
            self.settings.startTimeout,
            lambda: any(answers(candidate) for candidate in candidates),
        )
        starting.addCallback(self._startDone)
        starting.addErrback(lambda failure: failure.trap(CancelledError))

    def _startDone(self, outcome: Optional[BackendUnusable]) -> None:
        self._starting = None
        if outcome is not None:
            self._reject(outcome)
            return
        assert self.route is not None
        self._tried = []
        self.backend = self.route.candidates[0]
        self._connectBy = self.factory.reactor.seconds() + self.settings.connectTimeout
        self._connect()

    def _forTheUser(self, reason: BackendUnusable) -> BackendUnusable:
        """C{reason} as the client may read it (see L{forTheUser})."""
        if not reason.aboutThePath:
            return reason
        return forTheUser(reason, self._target, look(self.backend.path, self._viewer()))

    def _reject(self, reason: BackendUnusable) -> None:
        reason = self._forTheUser(reason)
        advice = self.settings.resolver.advice
        self._endAs("rejected:" + reason.cause)
        self.factory.rejected(self, reason.cause)
        self._responder = ErrorResponder(
            self.factory.reactor,
            self.transport,
            reason.status,
            advice.render(reason),
            waitForRequest=reason.waitForRequest,
        )
        self.transport.resumeProducing()

    def _viewer(self) -> Viewer:
        """
        Whose eyes judge what the client may be told: the client's own, or,
        for a process in a user's container (which runs as a uid of the
        user's range), that user's, with no groups.
        """
        if self.backend.uid != self.client.uid:
            return Viewer(self.backend.uid, frozenset())
        # Judged by fewer groups than the client has, if the kernel won't say.
        groups = peerGroups(self.transport.getHandle()) or frozenset()
        return Viewer(self.client.uid, groups | {self.client.gid})

    def _relayEnded(self, failure: Optional[str]) -> None:
        """Both directions ended (C{None}), or one side failed."""
        assert self._splicer is not None
        self._splicer.close()
        self._endAs(failure or "closed")
        self._record()

    # Twisted reads a connection only while it is being rejected.

    def dataReceived(self, data: bytes) -> None:
        assert self._responder is not None
        self._responder.dataReceived(data)

    def readConnectionLost(self) -> None:
        assert self._responder is not None
        self._responder.readConnectionLost()

    def writeConnectionLost(self) -> None:
        pass  # the responder half-closed after its answer

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._starting is not None:
            self._starting.cancel()
        if self._responder is not None:
            self._responder.connectionLost()
        if not reason.check(error.ConnectionDone):
            self._endAs("client:" + type(reason.value).__name__)
        self._record()

    def abort(self, why: str) -> None:
        """End this connection now (shutdown ran out of time)."""
        self._endAs(why)
        if self._splicer is not None:
            self._relayEnded(why)
        else:
            self.transport.abortConnection()

    def _endAs(self, why: str) -> None:
        """Remember how the connection ended; the first cause is the cause."""
        if self.ended is None:
            self.ended = why

    def _record(self) -> None:
        """
        The one record of a finished connection (a refused one has had its
        line, from L{RouterFactory.rejected}).
        """
        if self._recorded:
            return
        self._recorded = True
        if self.route is None and self._responder is None:
            return  # gone while its route was looked up: never counted
        splicer = self._splicer
        if self._responder is not None:
            self.factory.release(self)
            return
        duration = self.factory.reactor.seconds() - self.startedAt
        self.factory.records.add(
            uid=self.client.uid,
            user=self.backend.user,
            pid=self.client.pid,
            backend=self.backend.path,
            duration=duration,
            bytesToDocker=splicer.toDocker if splicer else 0,
            bytesFromDocker=splicer.fromDocker if splicer else 0,
            end=self.ended or "closed",
        )
        self.factory.release(self, duration)

    def bytesMoved(self) -> tuple[int, int]:
        """Bytes to and from Docker so far."""
        splicer = self._splicer
        return (splicer.toDocker, splicer.fromDocker) if splicer else (0, 0)


class RouterFactory(Factory):
    """
    Builds a L{ServerProtocol} per client, counts the live ones against the
    caps, and lets a shutdown wait for them.
    """

    noisy = False
    protocol = ServerProtocol  # type: ignore[assignment]  # Factory is generic only to type checkers
    openSocketFile = staticmethod(openSocketFile)
    connectUnix = staticmethod(connectUnix)
    # Starts users' daemons on demand (a Starter), used when settings.start.
    starter: Any = None
    _pid: Optional[int] = None

    def startFactory(self) -> None:
        # Here, not in __init__: twistd forks between the two.
        self._pid = os.getpid()

    def stopFactory(self) -> None:
        self.records.stop()
        self.pipes.close()
        self.socketFiles.close()
        self.rejections.stop()
        self.budget.stop()

    def routerPid(self) -> int:
        """This process's pid, which no backend daemon may have."""
        return self._pid or os.getpid()

    def __init__(self, reactor: Any, settings: Settings, budget: Optional[Budget] = None) -> None:
        """
        @param settings: what new connections are handled with (a reload
            replaces them).
        @param budget: the kernel memory relays may hold in flight; by
            default L{Budget}'s defaults.
        """
        self.reactor = reactor
        self.settings = settings
        self.pipes = PipePool()
        # Looks up factory.openSocketFile on each call (tests replace it).
        self.socketFiles = SocketFiles(lambda path: self.openSocketFile(path))
        self.budget = budget if budget is not None else Budget(reactor)
        self.relays: Set[ServerProtocol] = set()
        self._perUser: dict[int, int] = {}
        self._whenIdle: list[Deferred] = []
        # The protocol's logger, made once (each instance's C{log} is a new
        # Logger): the per-connection record and the refusals go through it.
        self.recordLog = cast(RouterLogger, ServerProtocol.log)
        self.rejections = RejectionLog(reactor, self.recordLog)
        self.records = ConnectionRecords(reactor, self.recordLog)
        # What metrics and status read (at scrape time, not per chunk).
        # How connections were answered: "relayed", or a rejection's cause.
        self.results: dict[str, int] = {"relayed": 0}
        # Relayed connections by the configured socket path they went to.
        self.sockets: dict[str, int] = {}
        # Bytes to and from Docker of the relays that have ended.
        self.endedBytes = [0, 0]
        # Per user, when asked (settings.usersKept): uid -> [name, bytes to,
        # bytes from of ended relays], the most recently active last.
        self.recentUsers: "OrderedDict[int, list]" = OrderedDict()
        # Histograms (with an observe method) that metrics may set.
        self.durations: Optional[Buckets] = None
        self.connectTimes: Optional[Buckets] = None

    def relayed(self, connectSeconds: float, template: str = "") -> None:
        """A connection is relayed: count it, and by the socket it went to."""
        self.results["relayed"] += 1
        self.sockets[template] = self.sockets.get(template, 0) + 1
        if self.connectTimes is not None:
            self.connectTimes.observe(connectSeconds)

    def rejected(self, relay: ServerProtocol, cause: str) -> None:
        """A connection is refused: count it, and log it (coalesced)."""
        self.results[cause] = self.results.get(cause, 0) + 1
        self.rejections.rejected(
            relay.client.uid, relay.backend.user, relay.client.pid, relay.backend.path, cause
        )

    def admit(self, relay: ServerProtocol) -> None:
        """
        Count a new connection against its user's cap and the total cap, so
        that no user can starve the others or the host.  One turned away is
        not counted (it is answered at once and gone within a second), so
        a flood over the cap can't push anyone else over the total.

        @raise BackendUnusable: over a cap.
        """
        uid = relay.backend.uid
        held = self._perUser.get(uid, 0)
        settings = relay.settings
        if settings.maxConnections is not None and len(self.relays) >= settings.maxConnections:
            raise TooManyInTotal(relay.backend, str(settings.maxConnections))
        if settings.maxConnectionsPerUser is not None and held >= settings.maxConnectionsPerUser:
            raise TooManyForUser(relay.backend, str(settings.maxConnectionsPerUser))
        self.relays.add(relay)
        self._perUser[uid] = held + 1
        if settings.usersKept:
            self._recentUser(relay.backend)

    def _recentUser(self, backend: Backend) -> list:
        kept = self.recentUsers.get(backend.uid)
        if kept is None:
            kept = self.recentUsers[backend.uid] = [backend.user, 0, 0]
            while len(self.recentUsers) > self.settings.usersKept:
                self.recentUsers.popitem(last=False)
        else:
            self.recentUsers.move_to_end(backend.uid)
        return kept

    def usersActive(self) -> int:
        """How many users hold live connections."""
        return len(self._perUser)

    def userConnections(self, uid: int) -> int:
        return self._perUser.get(uid, 0)

    def release(self, relay: ServerProtocol, duration: Optional[float] = None) -> None:
        """A connection has ended: uncount it, and tell a waiting drain."""
        if relay not in self.relays:
            return
        self.relays.remove(relay)
        if duration is not None:
            toDocker, fromDocker = relay.bytesMoved()
            self.endedBytes[0] += toDocker
            self.endedBytes[1] += fromDocker
            if self.settings.usersKept:
                kept = self._recentUser(relay.backend)
                kept[1] += toDocker
                kept[2] += fromDocker
            if self.durations is not None:
                self.durations.observe(duration)
        uid = relay.backend.uid
        self._perUser[uid] -= 1
        if not self._perUser[uid]:
            del self._perUser[uid]
        if not self.relays:
            waiting, self._whenIdle = self._whenIdle, []
            for d in waiting:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred:
        """
        Let the live relays finish for up to C{timeout} seconds, then abort
        the rest.  Fires with how many finished and how many were aborted.
        """
        live = len(self.relays)
        aborted: list[int] = [0]

        def abortTheRest() -> None:
            aborted[0] = len(self.relays)
            for relay in list(self.relays):
                relay.abort("aborted:shutdown")

        timer = self.reactor.callLater(timeout, abortTheRest)
        idle: Deferred = Deferred()
        if self.relays:
            self._whenIdle.append(idle)
        else:
            idle.callback(None)

        def done(_: None) -> tuple[int, int]:
            if timer.active():
                timer.cancel()
            # Every record before the summary of the drain.
            self.records.flush()
            return live - aborted[0], aborted[0]

        return idle.addCallback(done)
