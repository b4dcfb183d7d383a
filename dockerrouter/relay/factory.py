"""
The router's factory: a L{ServerProtocol} per client, the live ones counted
against the caps, a shutdown's drain, and the plain counters metrics and
status read.
"""

import os
import socket
from collections import OrderedDict
from typing import Any, Callable, Optional, Set, cast
from weakref import WeakSet

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory

from dockerrouter.base.logging import ConnectionRecords, RejectionLog, RouterLogger
from dockerrouter.relay.budget import Budget
from dockerrouter.relay.cached import CachedOpener
from dockerrouter.relay.handover import HandedRelay, RelayRecord
from dockerrouter.relay.protocol import ConnectionsFactory, ServerProtocol
from dockerrouter.relay.settings import Settings
from dockerrouter.relay.sockets import connectUnix, openSocketFile
from dockerrouter.relay.splice import Pipe, PipePool
from dockerrouter.relay.stats import Histogram
from dockerrouter.relay.workers import RunsJobs, Workers
from dockerrouter.routing.credentials import peerCredentials
from dockerrouter.routing.reasons import BackendUnusable, TooManyForUser, TooManyInTotal, verifyDaemon
from dockerrouter.routing.route import Backend


class RouterFactory(Factory):
    """
    Builds a L{ServerProtocol} per client, counts the live ones against the
    caps, and lets a shutdown wait for them.
    """

    noisy = False
    # How many refused connections of one user may be answered at their
    # own pace (counted, waiting for the request line) at once; the rest
    # are answered at once.
    refusalsPerUser = 16
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
        # Opens a path on the reactor where that can't wait (tests replace it).
        self.openCached: Callable[[str], tuple[int, os.stat_result]] = CachedOpener(reactor.seconds)
        self.budget = budget if budget is not None else Budget(reactor)
        self.relays: Set[ServerProtocol] = set()
        # Every connection, counted or not yet (a restart hands them all over).
        self._connections: "WeakSet[ServerProtocol]" = WeakSet()
        self._perUser: dict[int, int] = {}
        # Of those, per user: the refused ones being answered.
        self._refused: dict[int, Set[ServerProtocol]] = {}
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

    def buildProtocol(self, addr: Any) -> Optional[ServerProtocol]:  # type: ignore[override]  # Factory is generic only to type checkers
        relay = cast(ServerProtocol, super().buildProtocol(addr))
        self._connections.add(relay)
        return relay

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
        self._count(relay)
        if relay.settings.usersKept:
            self._recentUser(relay.backend)

    def _count(self, relay: ServerProtocol) -> None:
        """Count C{relay} against the caps, or raise L{BackendUnusable}."""
        uid = relay.backend.uid
        held = self._perUser.get(uid, 0)
        settings = relay.settings
        if settings.maxConnections is not None and len(self.relays) >= settings.maxConnections:
            raise TooManyInTotal(relay.backend, str(settings.maxConnections))
        if settings.maxConnectionsPerUser is not None and held >= settings.maxConnectionsPerUser:
            raise TooManyForUser(relay.backend, str(settings.maxConnectionsPerUser))
        self._hold(relay)

    def _hold(self, relay: ServerProtocol) -> None:
        """Count C{relay}, within the caps or not (see L{resume})."""
        uid = relay.backend.uid
        self.relays.add(relay)
        self._perUser[uid] = self._perUser.get(uid, 0) + 1

    def admitRefused(self, relay: ServerProtocol) -> bool:
        """
        Count a refused connection while it is answered, so that a flood of
        refused clients costs the caps, and descriptors only within them.
        One admitted before it was refused is counted already.  One refused
        before (denied by a rule, its lookup failed, over a cap) is counted
        if its user has fewer than L{refusalsPerUser} being answered and
        the caps have room; else it is not counted, and must be answered at
        once (it is gone within a second).

        @return: whether C{relay} is counted.
        """
        if relay in self.relays:
            return True
        uid = relay.backend.uid
        if len(self._refused.get(uid, ())) >= self.refusalsPerUser:
            return False
        try:
            self._count(relay)
        except BackendUnusable:
            return False
        self._refused.setdefault(uid, set()).add(relay)
        return True

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
        refused = self._refused.get(uid)
        if refused is not None and relay in refused:
            refused.remove(relay)
            if not refused:
                del self._refused[uid]
        self._perUser[uid] -= 1
        if not self._perUser[uid]:
            del self._perUser[uid]
        if not self.relays:
            waiting, self._whenIdle = self._whenIdle, []
            for d in waiting:
                d.callback(None)

    def handOver(self) -> tuple[list[HandedRelay], list[socket.socket]]:
        """
        Give up every connection to the next process (a restart): each
        relay's sockets, pipes and record so far, and the sockets of the
        clients still waiting to be routed (see L{ServerProtocol.handOver}).
        Nothing is relayed or recorded here any more.
        """
        relays: list[HandedRelay] = []
        waiting: list[socket.socket] = []
        for connection in list(self._connections):
            handed = connection.handOver()
            if isinstance(handed, HandedRelay):
                relays.append(handed)
            elif handed is not None:
                waiting.append(handed)
        self.relays.clear()
        self._perUser.clear()
        self._refused.clear()
        return relays, waiting

    def resume(
        self, record: RelayRecord, client: socket.socket, daemon: socket.socket, pipes: tuple[Optional[Pipe], Optional[Pipe]]
    ) -> None:
        """
        Go on with a relay the last process handed over, counted against
        the caps (it is never refused: it is already live) and drawing on
        the budget as it did there.  Its sockets are checked again first:
        the record is only as good as the store it came through.

        @raise BackendUnusable: the daemon is not one the client may reach.
        @raise ValueError: the client is not the one recorded.
        """
        if peerCredentials(client) != record.client:
            raise ValueError(f"the client is {peerCredentials(client)}, not {record.client}")
        verifyDaemon(record.backend, peerCredentials(daemon), self.routerPid())
        relay = cast(ServerProtocol, self.buildProtocol(None))
        relay.settings = self.settings
        relay.backend = record.backend
        self._hold(relay)
        if relay.settings.usersKept:
            self._recentUser(relay.backend)
        relay.resume(record, client, daemon, pipes)

    def adopt(self, client: socket.socket) -> None:
        """Route a client the last process accepted as if just accepted here."""
        self.reactor.adoptStreamConnection(client.fileno(), socket.AF_UNIX, self)
        client.close()  # the reactor made its own duplicate

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


# What a connection needs of its factory, checked by mypy here: the protocol
# knows the factory only by that (no import circle).
_needs: type[ConnectionsFactory] = RouterFactory
