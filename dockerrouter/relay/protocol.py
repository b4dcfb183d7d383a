"""
One client connection: who it is, the daemon it may reach, and the relay
between them.

The L{ServerProtocol} owns the connection from start to end: it reads the
client's credentials, holds the client's bytes in the kernel until there is
somewhere to send them, connects to the backend, verifies the daemon it
reached (the look at the path is L{dockerrouter.relay.sockets.reach}, in a
worker), and only then hands both sockets to a L{Splicer}, which moves the
bytes inside the kernel.  When the backend can't be used, an
L{ErrorResponder} answers instead.  Where the backend is and what makes it
acceptable is the resolver's and C{verifyDaemon}'s business; this module
knows neither paths nor users.

A connection is in one L{State} at a time, and waits on at most one thing
(a Deferred or a timer).  Whatever it waits on comes back through
L{ServerProtocol._guarded}: an exception there ends that connection, and
only that one, the way any other end does (L{ServerProtocol._end}).
"""

import os
import socket
from enum import Enum
from typing import Any, Callable, Optional, Protocol as TypingProtocol, Union

from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dockerrouter.base.logging import ConnectionRecords, RouterLogger
from dockerrouter.relay.budget import Budget
from dockerrouter.relay.errors import ErrorResponder, answerAndClose
from dockerrouter.relay.handover import HandedRelay, RelayRecord
from dockerrouter.relay.settings import Settings
from dockerrouter.relay.sockets import Reached, anyAnswers, reach
from dockerrouter.relay.splice import Pipe, PipePool, Splicer
from dockerrouter.relay.workers import RunsJobs
from dockerrouter.routing.credentials import Credentials, peerCredentials
from dockerrouter.routing.reasons import (
    BackendUnusable,
    ConnectTimeout,
    LookupFailed,
    NoneWorked,
    PathHung,
    forTheUser,
    verifyDaemon,
)
from dockerrouter.routing.resolver import Judged
from dockerrouter.routing.route import Backend, Route
from dockerrouter.routing.rules import NeedLookup
from dockerrouter.routing.visibility import Found, Missing, Viewer, look
from dockerrouter.relay.cached import NotCached


# How soon to try again a daemon whose listen backlog is full.
_RETRY_DELAY = 0.05

# What sends a connection on to the next socket of its chain: nothing usable
# is there.  Anything else (a daemon of the wrong uid, a loop back to the
# router, a hung daemon) is an attack or a mistake, and is refused at once.
_NEXT_CANDIDATE = frozenset({"missing", "refused", "not-a-socket"})


class State(Enum):
    """Where a connection is in its life, and what it waits on there."""

    # Its chain is being found (a name looked up in a thread): not counted.
    RESOLVING = "resolving"
    # Counted; a candidate is being reached, or what the client may be told
    # of one is being looked at (a worker job).
    CONNECTING = "connecting"
    # The daemon's listen backlog is full: a retry is due (a timer).
    WAITING_FOR_BACKLOG = "waiting-for-backlog"
    # Its daemon is being started on demand (the starter's Deferred).
    STARTING = "starting"
    # Refused: the L{ErrorResponder} answers it.
    ANSWERING = "answering"
    # The L{Splicer} has both sockets.
    RELAYING = "relaying"
    ENDED = "ended"


class ConnectionsFactory(TypingProtocol):
    """What a connection needs of its factory (L{RouterFactory}'s part)."""

    reactor: Any
    settings: Settings
    workers: RunsJobs
    pipes: PipePool
    budget: Budget
    starter: Any
    records: ConnectionRecords
    openCached: Callable[[str], tuple[int, os.stat_result]]

    def openSocketFile(self, path: str) -> tuple[int, os.stat_result]: ...

    def connectUnix(self, path: str) -> socket.socket: ...

    def routerPid(self) -> int: ...

    def admit(self, relay: "ServerProtocol") -> None: ...

    def admitRefused(self, relay: "ServerProtocol") -> bool: ...

    def relayed(self, connectSeconds: float, template: str = "") -> None: ...

    def rejected(self, relay: "ServerProtocol", cause: str) -> None: ...

    def release(self, relay: "ServerProtocol", duration: Optional[float] = None) -> None: ...


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
    factory: ConnectionsFactory
    # A Unix server connection (getHandle, pauseProducing, abortConnection)
    # until relayed or lost, then None: more than Protocol's
    # Optional[ITransport].
    transport: Any

    state = State.RESOLVING
    client: Credentials
    # The candidate being tried, then the one relayed to.
    backend: Backend
    route: Optional[Route] = None
    ended: Optional[str] = None
    # What the connection waits on (see L{State}): a Deferred or a timer.
    _pending: Union[Deferred, IDelayedCall, None] = None
    # The file the backend path led to, when it could be opened.
    _target: Optional[os.stat_result] = None
    _splicer: Optional[Splicer] = None
    _responder: Optional[ErrorResponder] = None
    # The on-demand start is asked for once per connection.
    _startTried = False
    # What the kernel says of the client (see BackendResolver.judge).
    judged: Optional[Judged] = None

    def connectionMade(self) -> None:
        self.startedAt = self.factory.reactor.seconds()
        # Read once: a reload gives later connections other settings.
        self.settings = self.factory.settings
        self._guarded(self._identify)

    def _identify(self) -> None:
        self.client = peerCredentials(self.transport.getHandle())
        self._route()

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """
        Run C{step}, a way into this connection from the reactor (its
        start, a timer): an exception there ends this connection and goes
        no further (see L{_crashed}).  A Deferred's way in ends with
        C{addErrback(self._crashed)} for the same.
        """
        try:
            step(*args)
        except Exception:
            self._crashed(Failure())

    def _crashed(self, failure: Failure) -> None:
        """
        Something this connection did failed unexpectedly: log it, once and
        with the client's uid, and end the connection as any other end does,
        so that it holds no cap slot, budget or descriptor.
        """
        if self.state is State.ENDED and failure.check(CancelledError):
            return  # what it waited on, cancelled as it ended
        client = getattr(self, "client", None)
        self.log.failure(
            "connection of uid {uid} failed while {state}",
            failure,
            uid=client.uid if client is not None else "unknown",
            state=self.state.value,
        )
        self._end("failed:" + type(failure.value).__name__)

    def _route(self, _: object = None) -> None:
        """
        Find the client's chain, admit it and connect; while a name is
        looked up (off the reactor thread), the connection waits here
        without holding anyone else, and comes back when it is known.
        """
        self._pending = None
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
            self._pending = waiting.deferred.addTimeout(self.settings.connectTimeout, self.factory.reactor)
            waiting.deferred.addCallbacks(self._route, self._lookupFailed).addErrback(self._crashed)
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
        self._pending = None
        if self.state is State.ENDED:
            return  # cancelled as it ended
        self.log.failure("user database lookup for uid {uid}", failure, uid=self.client.uid)
        self.backend = Backend("-", self.client.uid, str(self.client.uid))
        self._reject(LookupFailed(self.backend, failure.getErrorMessage()))

    def _connect(self) -> None:
        """
        Try the candidate: at once, where the kernel answers from its
        caches without waiting (L{CachedOpener}); else the look at its path
        runs in a worker (one of the user's few), bounded by the connect
        timeout, while the client waits paused.  Either way the result
        comes to L{_reached}.  (Each attempt has the whole timeout: one
        made just before a full backlog's deadline must not read as a path
        that hung.)
        """
        self.state = State.CONNECTING
        self._pending = None
        self._target = None
        try:
            reached = reach(self.backend, self.factory.openCached, self.factory.connectUnix)
        except NotCached:
            pass
        else:
            self._reached(reached)
            return
        self._wait()
        self._pending = job = self._inWorker(
            self.settings.connectTimeout,
            reach,
            self.backend,
            self.factory.openSocketFile,
            self.factory.connectUnix,
            discard=Reached.close,
        )
        job.addCallbacks(self._reached, self._notReached).addErrback(self._crashed)

    def _inWorker(self, timeout: float, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """C{function(*args)} as one of this connection's user's worker jobs."""
        job = self.factory.workers.run(self.backend.uid, function, *args, **kwargs)
        return job.addTimeout(timeout, self.factory.reactor)

    def _reached(self, reached: Reached) -> None:
        self._pending = None
        self._target = reached.target
        if reached.full:
            # The daemon's listen backlog is full: wait for room, as a
            # blocking connect would, up to the connect timeout.
            if self.factory.reactor.seconds() < self._connectBy:
                self._wait()
                self.state = State.WAITING_FOR_BACKLOG
                self._pending = self.factory.reactor.callLater(_RETRY_DELAY, self._guarded, self._connect)
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
        try:
            self._splicer = Splicer(
                self.factory.reactor,
                self.factory.pipes,
                self.transport.getHandle(),
                daemon,
                self._relayEnded,
                self.factory.budget,
                self.backend.uid,
            )
        except BaseException:
            daemon.close()
            raise
        self.state = State.RELAYING
        transport, self.transport = self.transport, None
        self._splicer.start(transport)
        self.factory.relayed(self.factory.reactor.seconds() - self._connectFrom, self.backend.template)

    def _notReached(self, failure: Failure) -> None:
        self._pending = None
        if self.state is State.ENDED:
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
        self._forTheUser(reason).addCallback(self._nextCandidate).addErrback(self._crashed)

    def _nextCandidate(self, told: BackendUnusable) -> None:
        """The last candidate failed (C{told}: as the client may read it)."""
        assert self.route is not None
        if self.state is State.ENDED:
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
        self.state = State.STARTING
        # It may fire at once: kept only while it waits.
        self._pending = starting = starter.start(
            candidates[0],
            self.settings.startTimeout,
            lambda: self.factory.workers.run(candidates[0].uid, anyAnswers, candidates),
        )
        starting.addCallback(self._startDone).addErrback(self._crashed)

    def _startDone(self, outcome: Optional[BackendUnusable]) -> None:
        self._pending = None
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
        self._wait()
        self._pending = job = self._inWorker(
            self.settings.connectTimeout, look, reason.backend.path, self._viewer()
        )

        def told(sight: Union[Found, Missing, None]) -> BackendUnusable:
            self._pending = None
            return forTheUser(reason, target, sight)

        def untold(failure: Failure) -> BackendUnusable:
            if not failure.check(defer.TimeoutError, CancelledError):
                self.log.failure("looking at {path} as uid {uid}", failure, path=reason.backend.path, uid=self.client.uid)
            return told(None)

        return job.addCallbacks(told, untold)

    def _reject(self, reason: BackendUnusable) -> None:
        self._forTheUser(reason).addCallback(self._answer).addErrback(self._crashed)

    def _answer(self, reason: BackendUnusable) -> None:
        """
        Answer the client with C{reason} (as they may read it).  It may
        wait for the request line only while it is counted against the caps
        (see L{RouterFactory.admitRefused}); past its user's bound of those,
        it is answered and closed at once.
        """
        if self.state is State.ENDED:
            return
        self._pending = None
        self.state = State.ANSWERING
        message = self.settings.resolver.advice.render(reason)
        self._endAs("rejected:" + reason.cause)
        self.factory.rejected(self, reason.cause)
        if reason.waitForRequest and not self.factory.admitRefused(self):
            answerAndClose(self.transport, reason.status, message)
            return
        self._responder = ErrorResponder(
            self.factory.reactor,
            self.transport,
            reason.status,
            message,
            waitForRequest=reason.waitForRequest,
        )
        self.transport.resumeProducing()

    def _viewer(self) -> Viewer:
        """
        Whose eyes judge what the client may be told: the client's own, or,
        for a process in a user's container (which runs as a uid of the
        user's range), that user's, with no groups.  Groups only as judged
        (the kernel's word, in the router's user namespace; none where no
        rule reads them): a gid mapped in a namespace of one's own must not
        show more than the uid could see.
        """
        if self.backend.uid != self.client.uid:
            return Viewer(self.backend.uid, frozenset())
        groups = self.judged.groups if self.judged is not None else frozenset()
        return Viewer(self.client.uid, groups)

    def _relayEnded(self, failure: Optional[str]) -> None:
        """Both directions ended (C{None}), or one side failed."""
        self._end(failure or "closed")

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
        self.transport = None
        self._end(None if reason.check(error.ConnectionDone) else "client:" + type(reason.value).__name__)

    def abort(self, why: str) -> None:
        """End this connection now (shutdown ran out of time)."""
        self._end(why)

    def _end(self, why: Optional[str]) -> None:
        """
        The one way a connection ends, whatever its state: stop what it
        waits on, close what it holds, and leave its record (see
        L{_record}).  The first cause is the cause.
        """
        if self.state is State.ENDED:
            return
        endedIn, self.state = self.state, State.ENDED
        if why is not None:
            self._endAs(why)
        try:
            self._stopWaiting()
            if self._responder is not None:
                self._responder.connectionLost()
            if self._splicer is not None:
                self._splicer.close()
            elif self.transport is not None:
                self.transport.abortConnection()
        finally:
            self._record(endedIn)

    def _stopWaiting(self) -> None:
        """Cancel what the connection waits on (a Deferred or a timer)."""
        pending, self._pending = self._pending, None
        if isinstance(pending, Deferred):
            pending.cancel()
        elif pending is not None and pending.active():
            pending.cancel()

    def _endAs(self, why: str) -> None:
        """Remember how the connection ended; the first cause is the cause."""
        if self.ended is None:
            self.ended = why

    def _record(self, endedIn: State) -> None:
        """
        Uncount a finished connection, with its one record: none for one
        that ended before it was admitted (not counted) or while it was
        refused (it has had its line, from L{RouterFactory.rejected}).
        """
        if endedIn in (State.RESOLVING, State.ANSWERING):
            self.factory.release(self)
            return
        splicer = self._splicer
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

    def handOver(self) -> Union[HandedRelay, socket.socket, None]:
        """
        Give this connection up to the next process (a restart), recording
        nothing here: a relay's sockets, pipes and record so far; for a
        client still waiting to be routed, a duplicate of its socket (its
        request is still in the kernel: the next process routes it afresh);
        nothing for one being refused, which is cut, or one that has ended.
        """
        if self.state is State.ENDED:
            return None
        handedIn, self.state = self.state, State.ENDED
        self._stopWaiting()
        if handedIn is State.RELAYING:
            assert self._splicer is not None
            handed = self._splicer.handOver()
            record = RelayRecord(self.client, self.backend, self.startedAt, handed.up, handed.down)
            return HandedRelay(record, handed)
        if handedIn is State.ANSWERING:
            if self._responder is not None:
                self._responder.connectionLost()
            self.transport.abortConnection()
            return None
        # Nothing is closed (nor shut down) here: the duplicate goes on.
        client: socket.socket = self.transport.getHandle().dup()
        return client

    def resume(
        self, record: RelayRecord, client: socket.socket, daemon: socket.socket, pipes: tuple[Optional[Pipe], Optional[Pipe]]
    ) -> None:
        """
        Go on with a relay the last process handed over (see L{handOver}),
        counted by the factory.
        """
        self.settings = self.factory.settings
        self.client = record.client
        self.backend = record.backend
        self.route = Route((record.backend,))
        self.startedAt = record.startedAt
        self.transport = None
        self.state = State.RELAYING
        self._splicer = Splicer(
            self.factory.reactor,
            self.factory.pipes,
            client,
            daemon,
            self._relayEnded,
            self.factory.budget,
            self.backend.uid,
        )
        self._splicer.resume(record.up, record.down, *pipes)

    def bytesMoved(self) -> tuple[int, int]:
        """Bytes to and from Docker so far."""
        splicer = self._splicer
        return (splicer.toDocker, splicer.fromDocker) if splicer else (0, 0)
