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
from typing import Any, Callable, Optional, Sequence, Set, Union, cast

from attrs import define
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dockerrouter.routing.reasons import (
    BackendUnusable,
    ConnectTimeout,
    LookupFailed,
    NoneWorked,
    PathHung,
    TooManyForUser,
    TooManyInTotal,
    checkSocketFile,
    explainConnectFailure,
    forTheUser,
    verifyDaemon,
)
from dockerrouter.routing.resolver import Judged
from dockerrouter.routing.route import Backend, Route
from dockerrouter.routing.credentials import Credentials, peerCredentials, peerGroups
from dockerrouter.relay.errors import ErrorResponder
from dockerrouter.relay.budget import Budget
from dockerrouter.base.logging import ConnectionRecords, RejectionLog, RouterLogger
from dockerrouter.routing.rules import NeedLookup
from dockerrouter.relay.settings import Settings
from dockerrouter.relay.splice import PipePool, Splicer
from dockerrouter.relay.stats import Histogram
from dockerrouter.routing.visibility import Found, Missing, Viewer, look
from dockerrouter.relay.workers import RunsJobs, Workers

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
    # The worker job this connection waits on (a connect, a look).
    _job: Optional[Deferred] = None
    # What the kernel says of the client (see BackendResolver.judge).
    judged: Optional[Judged] = None

    def connectionMade(self) -> None:
        self.startedAt = self.factory.reactor.seconds()
        self.client = peerCredentials(self.transport.getHandle())
        # Read once: a reload gives later connections other settings.
        self.settings = self.factory.settings
        self._route()

    def _route(self, _: object = None) -> None:
        """
        Find the client's chain, admit it and connect; while a name is
        looked up (off the reactor thread), the connection waits here
        without holding anyone else, and comes back when it is known.
        """
        if self._lost:
            return
        resolver = self.settings.resolver
        try:
            if self.judged is None:
                # Judged once, as soon as the subordinate ranges are known
                # (at accept, but for the router's first read of them).
                self.judged = resolver.judge(self.client, self.transport.getHandle())
            route = resolver.resolve(self.client, self.judged)
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
        """
        Try the candidate: the look at its path runs in a worker (one of
        the user's few), bounded by the connect timeout, while the client
        waits paused; the result comes back to L{_reached}.  (Each attempt
        has the whole timeout: one made just before a full backlog's
        deadline must not read as a path that hung.)
        """
        self._retry = None
        self._target = None
        self._wait()
        self._job = self._inWorker(
            self.settings.connectTimeout,
            reach,
            self.backend,
            self.factory.openSocketFile,
            self.factory.connectUnix,
            discard=Reached.close,
        )
        self._job.addCallbacks(self._reached, self._notReached)

    def _inWorker(self, timeout: float, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """C{function(*args)} as one of this connection's user's worker jobs."""
        job = self.factory.workers.run(self.backend.uid, function, *args, **kwargs)
        return job.addTimeout(timeout, self.factory.reactor)

    def _reached(self, reached: Reached) -> None:
        self._job = None
        self._target = reached.target
        if reached.full:
            # The daemon's listen backlog is full: wait for room, as a
            # blocking connect would, up to the connect timeout.
            if self.factory.reactor.seconds() < self._connectBy:
                self._retry = self.factory.reactor.callLater(_RETRY_DELAY, self._connect)
            else:
                self._reject(ConnectTimeout(self.backend, f"{self.settings.connectTimeout:g}"))
            return
        if reached.reason is not None:
            self._failed(reached.reason)
            return
        daemon = reached.daemon
        assert daemon is not None and reached.credentials is not None
        try:
            verifyDaemon(self.backend, reached.credentials, self.factory.routerPid())
        except BackendUnusable as reason:
            daemon.close()
            self._reject(reason)
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

    def _notReached(self, failure: Failure) -> None:
        self._job = None
        if self._lost:
            return  # cancelled when the client left
        if failure.check(defer.TimeoutError):
            self._reject(PathHung(self.backend, f"{self.settings.connectTimeout:g}"))
            return
        self.log.failure("connecting uid {uid} to {path}", failure, uid=self.client.uid, path=self.backend.path)
        self._reject(BackendUnusable(self.backend, failure.getErrorMessage()))

    def _failed(self, reason: BackendUnusable) -> None:
        """
        The candidate can't be used: try the next one when nothing usable
        was there, else refuse at once (never fall through past a daemon
        of the wrong uid, or a path that hangs).
        """
        assert self.route is not None
        if reason.cause not in _NEXT_CANDIDATE:
            self._reject(reason)
            return
        if len(self.route.candidates) == 1:
            self._noneWorked(reason)
            return
        self._forTheUser(reason).addCallback(self._nextCandidate)

    def _nextCandidate(self, told: BackendUnusable) -> None:
        """The last candidate failed (C{told}: as the client may read it)."""
        assert self.route is not None
        if self._lost:
            return
        candidates = self.route.candidates
        self._tried.append(told)
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
            lambda: self.factory.workers.run(candidates[0].uid, anyAnswers, candidates),
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

    def _forTheUser(self, reason: BackendUnusable) -> "Deferred[BackendUnusable]":
        """
        C{reason} as the client may read it (see L{forTheUser}): the path
        walked as the user, in one of their workers, within the connect
        timeout; a walk that doesn't end in time tells the client nothing
        (nor does a path that hung: walking it would hang too).
        """
        if not reason.aboutThePath:
            return defer.succeed(reason)
        target = self._target
        if isinstance(reason, PathHung):
            return defer.succeed(forTheUser(reason, target, None))
        self._job = self._inWorker(self.settings.connectTimeout, look, reason.backend.path, self._viewer())

        def told(sight: Union[Found, Missing, None]) -> BackendUnusable:
            self._job = None
            return forTheUser(reason, target, sight)

        def untold(failure: Failure) -> BackendUnusable:
            if not failure.check(defer.TimeoutError, CancelledError):
                self.log.failure("looking at {path} as uid {uid}", failure, path=reason.backend.path, uid=self.client.uid)
            return told(None)

        return self._job.addCallbacks(told, untold)

    def _reject(self, reason: BackendUnusable) -> None:
        self._forTheUser(reason).addCallback(self._answer)

    def _answer(self, reason: BackendUnusable) -> None:
        """Answer the client with C{reason} (as they may read it)."""
        if self._lost:
            return
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
        if self._job is not None:
            self._job.cancel()
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
        self.rejections.stop()
        self.budget.stop()

    def routerPid(self) -> int:
        """This process's pid, which no backend daemon may have."""
        return self._pid or os.getpid()

    def __init__(
        self, reactor: Any, settings: Settings, budget: Optional[Budget] = None, workers: Optional[RunsJobs] = None
    ) -> None:
        """
        @param settings: what new connections are handled with (a reload
            replaces them).
        @param budget: the kernel memory relays may hold in flight; by
            default L{Budget}'s defaults.
        @param workers: the threads that look at users' paths; by default
            L{Workers}' defaults.
        """
        self.reactor = reactor
        self.settings = settings
        self.pipes = PipePool()
        self.workers: RunsJobs = workers if workers is not None else Workers(reactor)
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
        self.durations: Optional[Histogram] = None
        self.connectTimes: Optional[Histogram] = None

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
