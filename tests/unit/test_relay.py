"""
The relay's protocol logic, driven without sockets: pausing, verification
before anything moves, connect retries, rejection, records and the drain.
(What moves bytes is tested over real sockets in L{tests.unit.test_sockets}.)
"""

import errno
import os
import socket
import shutil
import stat
import tempfile
import time
from typing import Optional, Sequence

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.resolver import BackendResolver, Judged
from dockerrouter.routing.route import Backend, Route
from dockerrouter.relay.settings import Settings
from dockerrouter.routing.credentials import Credentials
from dockerrouter.base.logging import ConnectionRecords
from dockerrouter.relay import protocol as relay
from dockerrouter.relay.factory import RouterFactory
from dockerrouter.relay.protocol import ServerProtocol, State
from dockerrouter.routing.rules import Account, Lookups
from dockerrouter.routing.visibility import Found, Missing, Viewer, look
from dockerrouter.relay.splice import Splicer
from dockerrouter.service.starter import StartTimedOut
from tests.unit.doubles import FakeSocket, InlineWorkers, PeerTransport, asSocket, notCached, socketFile

ALICE = Credentials(pid=4242, uid=1000, gid=1000)
ALICE_DAEMON = Credentials(pid=5000, uid=1000, gid=1000)
ROUTER_PID = 99


class FakeDaemonSocket(FakeSocket):
    closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


class RelayHarness(SynchronousTestCase):
    """A factory whose opens and connects are the test's."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = RouterFactory(
            self.reactor,
            Settings(BackendResolver("/run/user/{uid}/docker.sock", lookupName={1000: "alice"}.__getitem__), 5),
            workers=InlineWorkers(),
        )
        self.factory.routerPid = lambda: ROUTER_PID
        self.connects: list[str] = []
        self.daemons: list[FakeDaemonSocket] = []
        self.daemon = ALICE_DAEMON
        self.connectError: Optional[OSError] = None
        self.openError: Optional[OSError] = None
        self.factory.openSocketFile = self.openSocketFile
        self.factory.openCached = notCached
        self.factory.connectUnix = self.connectUnix
        # What alice could see at her path: the socket opened (socketFile's).
        self.sight: object = Found(1, 1)
        self.patch(relay, "look", lambda path, viewer: self.sight)

    def openSocketFile(self, path: str):
        self.connects.append(path)
        if self.openError is not None:
            raise self.openError
        return socketFile(1000)

    def connectUnix(self, path: str) -> socket.socket:
        self.assertTrue(path.startswith("/proc/self/fd/"), path)
        if self.connectError is not None:
            raise self.connectError
        sock = FakeDaemonSocket(self.daemon)
        self.daemons.append(sock)
        return asSocket(sock)

    def connectClient(self) -> tuple[ServerProtocol, PeerTransport]:
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        transport = PeerTransport(ALICE)
        server.makeConnection(transport)
        return server, transport


class RelayTests(RelayHarness):
    def test_relaysOnlyAVerifiedDaemon(self) -> None:
        """
        The client is never read through Twisted; once the daemon is
        verified the splicer takes both sockets.
        """
        server, clientTransport = self.connectClient()
        self.assertEqual(clientTransport.producerState, "paused")
        self.assertEqual(self.connects, ["/run/user/1000/docker.sock"])
        self.assertIsInstance(server._splicer, Splicer)
        self.assertIsNone(server.transport)
        self.assertEqual(
            {r.fileno() for r in self.reactor.readers},
            {clientTransport.getHandle().fd, self.daemons[0].fd},
        )
        # No idle timeout: `docker events` and attach sessions sit idle for hours.
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_wrongOwnerIsNeverRelayed(self) -> None:
        """
        A daemon running as another uid is dropped before anything is
        relayed, and the client is told why.
        """
        self.daemon = Credentials(pid=1, uid=0, gid=0)
        with capturedLogs() as events:
            server, clientTransport = self.connectClient()
        self.assertTrue(self.daemons[0].closed)
        self.assertIsNone(server._splicer)
        self.assertEqual(self.reactor.readers, set())
        self.assertEqual(clientTransport.producerState, "producing")
        server.dataReceived(b"GET /containers/json HTTP/1.1\r\n\r\n")
        self.assertIn(b"403 Forbidden", clientTransport.value())
        self.assertIn(b"belongs to uid 0", clientTransport.value())
        [warning] = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual((warning["cause"], warning["uid"]), ("wrong-owner", 1000))

    def test_aRefusalWritesOneLine(self) -> None:
        """
        A refused connection is logged once, as a warning naming the cause
        and the path; the sentence meant for the user goes to the client
        only.  It is counted by its cause.
        """
        self.connectError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        with capturedLogs() as events:
            server, clientTransport = self.connectClient()
            server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
            server.readConnectionLost()
            server.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(
            [(e["log_level"].name, e["text"]) for e in events],
            [("warn", "rejected uid=1000 user=alice pid=4242 backend=/run/user/1000/docker.sock cause=missing")],
        )
        self.assertIn(b"No Docker daemon is running", clientTransport.value())
        self.assertEqual(self.factory.results, {"relayed": 0, "missing": 1})
        self.assertEqual(self.factory.relays, set())

    def test_routerLoop(self) -> None:
        self.daemon = Credentials(pid=ROUTER_PID, uid=1000, gid=0)
        server, clientTransport = self.connectClient()
        server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertIn(b"leads back to docker-router", clientTransport.value())

    def test_connectFailure(self) -> None:
        self.openError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        self.sight = Missing("/run/user/1000/docker.sock")
        server, clientTransport = self.connectClient()
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"503 Service Unavailable", clientTransport.value())
        self.assertIn(b"No Docker daemon is running for user alice", clientTransport.value())

    def test_fullBacklogIsRetriedUntilTheTimeout(self) -> None:
        """
        A daemon too busy to take the connection (EAGAIN) is tried again
        within the connect timeout, then reported as a timeout.
        """
        self.connectError = BlockingIOError(errno.EAGAIN, "busy")
        server, clientTransport = self.connectClient()
        self.assertEqual(len(self.connects), 1)
        self.reactor.advance(0.05)
        self.assertEqual(len(self.connects), 2)
        self.reactor.advance(5)
        attempts = len(self.connects)
        self.reactor.advance(1)
        self.assertEqual(len(self.connects), attempts)
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"504 Gateway Timeout", clientTransport.value())
        self.assertIn(b"within 5 seconds", clientTransport.value())

    def test_fullBacklogThenConnected(self) -> None:
        self.connectError = BlockingIOError(errno.EAGAIN, "busy")
        server, clientTransport = self.connectClient()
        self.connectError = None
        self.reactor.advance(0.05)
        self.assertIsInstance(server._splicer, Splicer)

    def test_clientLeavesDuringRetry(self) -> None:
        self.connectError = BlockingIOError(errno.EAGAIN, "busy")
        server, _ = self.connectClient()
        with capturedLogs() as events:
            server.connectionLost(Failure(error.ConnectionLost()))
            self.reactor.advance(ConnectionRecords.interval)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.factory.relays, set())
        self.assertEqual([e["end"] for e in events], ["client:ConnectionLost"])

    def test_oneRecordPerConnection(self) -> None:
        """
        A finished connection has one record, emitted within a tenth of a
        second (with others that ended meanwhile) and carrying the time it
        ended.
        """
        server, clientTransport = self.connectClient()
        self.reactor.advance(2.5)
        with capturedLogs() as events:
            ended = time.time()
            server._relayEnded(None)
            self.assertEqual(events, [])
            self.reactor.advance(ConnectionRecords.interval)
        [record] = events
        self.assertGreaterEqual(record["log_time"], ended)
        self.assertLess(record["log_time"], ended + 1)
        self.assertEqual(
            {k: record[k] for k in ("uid", "user", "pid", "backend", "end", "duration", "bytesToDocker")},
            {
                "uid": 1000,
                "user": "alice",
                "pid": 4242,
                "backend": "/run/user/1000/docker.sock",
                "end": "closed",
                "duration": 2.5,
                "bytesToDocker": 0,
            },
        )
        self.assertTrue(self.daemons[0].closed)
        self.assertEqual(self.factory.relays, set())
        self.assertEqual(self.reactor.readers, set())

    def test_failureIsRecorded(self) -> None:
        server, _ = self.connectClient()
        with capturedLogs() as events:
            server._relayEnded("docker:ECONNRESET")
            self.factory.records.flush()
        self.assertEqual([e["end"] for e in events], ["docker:ECONNRESET"])


class RealLookTests(RelayHarness):
    """
    What the client reads, with the real walk of the path as the user
    (L{look}, not the harness's stand-in), on real directories.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(relay, "look", look)
        # Root's, 0700: alice (uid 1000) can't search it.
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        resolver = BackendResolver(os.path.join(self.directory, "{uid}.sock"), lookupName={1000: "alice"}.__getitem__)
        self.factory.settings = Settings(resolver, 5)

    def answer(self) -> bytes:
        server, clientTransport = self.connectClient()
        server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        return clientTransport.value()

    def test_hiddenReadsAsTheConcealedSentence(self) -> None:
        """
        A socket of the wrong owner where alice can't look: she reads the
        one concealed sentence, not whose it is; the log keeps the cause.
        """
        self.daemon = Credentials(pid=1, uid=0, gid=0)
        with capturedLogs() as events:
            answer = self.answer()
        self.assertIn(b"does not lead to a Docker daemon socket of this user", answer)
        self.assertNotIn(b"uid 0", answer)
        [warning] = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(warning["cause"], "wrong-owner")

    def test_hiddenNothingThere(self) -> None:
        """Nothing there, where alice can't look: the same sentence."""
        self.openError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        answer = self.answer()
        self.assertIn(b"does not lead to a Docker daemon socket of this user", answer)
        self.assertNotIn(b"nothing at", answer)

    def test_visibleNothingThere(self) -> None:
        """Where alice can look for herself, she is told there is nothing there."""
        os.chmod(self.directory, 0o755)
        self.openError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        answer = self.answer()
        self.assertIn(b"there is nothing at " + self.directory.encode() + b"/1000.sock", answer)


class WorkerTests(RelayHarness):
    """
    The look at the user's path runs in a worker (held here until the test
    lets it finish): the client waits paused, a path that doesn't answer
    is answered at the connect timeout, and a late result is let go.
    """

    def setUp(self) -> None:
        super().setUp()
        self.workers = self.factory.workers = InlineWorkers(held=True)

    def test_pausedWhileTheConnectRuns(self) -> None:
        server, clientTransport = self.connectClient()
        self.assertEqual(clientTransport.producerState, "paused")
        self.assertIsNone(server._splicer)
        self.assertEqual(self.connects, [])
        self.workers.finish()
        self.assertEqual(self.connects, ["/run/user/1000/docker.sock"])
        self.assertIsInstance(server._splicer, Splicer)

    def test_clientGoneBeforeTheResult(self) -> None:
        """The daemon connected for a client that left is closed."""
        server, _ = self.connectClient()
        server.connectionLost(Failure(error.ConnectionLost()))
        self.workers.finish()
        self.assertTrue(self.daemons[0].closed)
        self.assertIsNone(server._splicer)
        self.assertEqual(self.factory.relays, set())

    def test_pathThatHangs(self) -> None:
        """
        Past the connect timeout the client reads the concealed sentence
        (never a look at the path, which would hang as well) and the log
        the cause; the late daemon is closed.
        """
        server, clientTransport = self.connectClient()
        self.reactor.advance(5)
        self.assertEqual(len(self.workers.jobs), 1)
        self.assertEqual(clientTransport.producerState, "producing")
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"502 Bad Gateway", clientTransport.value())
        self.assertIn(b"does not lead to a Docker daemon socket of this user", clientTransport.value())
        self.assertEqual(self.factory.results["path-timeout"], 1)
        self.workers.finish()
        self.assertTrue(self.daemons[0].closed)

    def test_lookThatHangs(self) -> None:
        """A walk as the user that doesn't end in time tells the client nothing."""
        self.connectError = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        server, clientTransport = self.connectClient()
        self.workers.finish()  # the connect: refused; now the look
        self.assertEqual(len(self.workers.jobs), 1)
        self.reactor.advance(5)
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"does not lead to a Docker daemon socket of this user", clientTransport.value())
        self.assertEqual(self.factory.results["refused"], 1)


class CachedPathTests(RelayHarness):
    """
    Where the kernel answers the open from its caches (the factory's
    C{openCached}), the attempt is made on the reactor: no worker job, the
    client never paused.  Anything else goes to a worker as before.
    """

    def setUp(self) -> None:
        super().setUp()
        self.workers = self.factory.workers = InlineWorkers(held=True)
        self.factory.openCached = self.openSocketFile

    def test_relayedWithoutAWorker(self) -> None:
        server, clientTransport = self.connectClient()
        self.assertEqual(self.workers.jobs, [])
        self.assertEqual(self.connects, ["/run/user/1000/docker.sock"])
        self.assertIsInstance(server._splicer, Splicer)

    def test_notCachedGoesToAWorker(self) -> None:
        self.factory.openCached = notCached
        server, clientTransport = self.connectClient()
        self.assertEqual(len(self.workers.jobs), 1)
        self.assertEqual(clientTransport.producerState, "paused")
        self.workers.finish()
        self.assertIsInstance(server._splicer, Splicer)

    def test_wrongOwnerRefusedOnTheReactor(self) -> None:
        """The daemon check is the same, wherever the attempt was made."""
        self.daemon = Credentials(4321, 0, 0)
        server, clientTransport = self.connectClient()
        self.assertIsNone(server._splicer)
        self.assertTrue(self.daemons[0].closed)
        self.workers.finish()  # the look for what the client may read
        self.assertEqual(self.factory.results["wrong-owner"], 1)

    def test_missingWaitsPausedForTheLook(self) -> None:
        """
        Nothing there (the kernel's answer): what the client may read is
        found by a walk in a worker, while the client waits paused.
        """
        self.openError = FileNotFoundError(errno.ENOENT, "missing")
        self.sight = Missing("/run/user/1000/docker.sock")
        server, clientTransport = self.connectClient()
        self.assertEqual(len(self.workers.jobs), 1)
        self.assertEqual(clientTransport.producerState, "paused")
        self.workers.finish()
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"503 Service Unavailable", clientTransport.value())


class ViewerTests(RelayHarness):
    """
    What the client may be told about a path is judged by the groups the
    router trusts (see L{BackendResolver.judge}), never by the raw
    C{SO_PEERGROUPS}: a gid mapped in a user namespace of one's own must
    not show more than the uid could see.
    """

    def test_untrustedGroupsShowNothing(self) -> None:
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        transport = PeerTransport(ALICE)
        transport.getHandle().groups = (150001,)
        server.makeConnection(transport)
        self.assertEqual(server.judged, Judged(1000, frozenset(), False))
        self.assertEqual(server._viewer(), Viewer(1000, frozenset()))

    def test_trustedGroups(self) -> None:
        server, _ = self.connectClient()
        server.judged = Judged(1000, frozenset({1000, 27}), True)
        self.assertEqual(server._viewer(), Viewer(1000, frozenset({1000, 27})))


class FakeStarter:
    """What the relay asks for a start: each request, and its Deferred."""

    def __init__(self) -> None:
        self.requests: list[tuple[Backend, float, Deferred]] = []
        self.cancelled: list[Backend] = []

    def start(self, backend: Backend, timeout: float, ready: object = None) -> Deferred:
        d: Deferred = Deferred(lambda _: self.cancelled.append(backend))
        self.requests.append((backend, timeout, d))
        return d


class OnDemandStartTests(RelayHarness):
    """With --start, a missing or refusing daemon is started, once."""

    def setUp(self) -> None:
        super().setUp()
        self.starter = self.factory.starter = FakeStarter()
        self.factory.settings = attrs.evolve(self.factory.settings, start="systemd", startTimeout=7.0)
        self.openError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        self.sight = Missing("/run/user/1000/docker.sock")

    def test_waitsForTheStartThenRelays(self) -> None:
        server, clientTransport = self.connectClient()
        [(backend, timeout, d)] = self.starter.requests
        self.assertEqual((backend.uid, timeout), (1000, 7.0))
        self.assertEqual((server._splicer, clientTransport.value(), clientTransport.producerState),
                         (None, b"", "paused"))
        self.openError = None
        d.callback(None)
        self.assertIsInstance(server._splicer, Splicer)
        self.assertEqual(self.factory.results["relayed"], 1)

    def test_aRefusingDaemonIsStartedToo(self) -> None:
        self.openError = None
        self.connectError = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        self.connectClient()
        self.assertEqual(len(self.starter.requests), 1)

    def test_startsOnlyOnce(self) -> None:
        """Still missing after the start: the client's own reason, no second start."""
        server, clientTransport = self.connectClient()
        self.starter.requests[0][2].callback(None)
        self.assertEqual(len(self.starter.requests), 1)
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"No Docker daemon is running for user alice", clientTransport.value())

    def test_theStartsReasonIsTheAnswer(self) -> None:
        server, clientTransport = self.connectClient()
        attempts = len(self.connects)
        self.starter.requests[0][2].callback(StartTimedOut(server.backend, "7"))
        self.assertEqual(len(self.connects), attempts)
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"504 Gateway Timeout", clientTransport.value())
        self.assertIn(b"within 7 seconds", clientTransport.value())
        self.assertEqual(self.factory.results["start-timeout"], 1)

    def route(self, *candidates: Backend) -> None:
        self.patch(self.factory.settings.resolver, "resolve", lambda client, sock=None: Route(candidates))

    def test_theChainIsTriedAgainFromItsStart(self) -> None:
        first, second = Backend("/a/1000.sock", 1000, "alice"), Backend("/b/1000.sock", 1000, "alice")
        self.route(first, second)
        server, _ = self.connectClient()
        self.assertEqual(self.connects, ["/a/1000.sock", "/b/1000.sock"])
        [(backend, _, d)] = self.starter.requests
        self.assertEqual(backend, first)
        self.openError = None
        d.callback(None)
        self.assertEqual(self.connects[2:], ["/a/1000.sock"])
        self.assertIsInstance(server._splicer, Splicer)

    def test_notForAnotherOwnersDaemon(self) -> None:
        """A rule's daemon of someone else's (root's, for a group) is not the user's to start."""
        self.route(Backend("/run/docker-system.sock", 1000, "alice", owner=0))
        self.connectClient()
        self.assertEqual(self.starter.requests, [])

    def test_anAnswerAtOnce(self) -> None:
        """A starter that answers at once (a system account, a cool-down)."""
        self.starter.start = lambda backend, timeout, ready=None: succeed(None)
        server, clientTransport = self.connectClient()
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"No Docker daemon is running for user alice", clientTransport.value())

    def test_clientLeavesWhileWaiting(self) -> None:
        server, _ = self.connectClient()
        server.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.starter.cancelled, [server.backend])
        self.assertEqual(self.factory.relays, set())

    def test_notWithoutStart(self) -> None:
        self.factory.settings = attrs.evolve(self.factory.settings, start=None)
        self.connectClient()
        self.assertEqual(self.starter.requests, [])

    def test_neverForAWrongOwner(self) -> None:
        self.openError = None
        self.daemon = Credentials(pid=5000, uid=0, gid=0)
        self.connectClient()
        self.assertEqual(self.starter.requests, [])


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = RouterFactory(self.reactor, Settings(BackendResolver("/x/{uid}"), 5), workers=InlineWorkers())
        self.factory.routerPid = lambda: ROUTER_PID
        self.factory.openSocketFile = lambda path: socketFile(1000)
        self.factory.openCached = notCached
        self.factory.connectUnix = lambda path: asSocket(FakeDaemonSocket(ALICE))

    def relay(self) -> ServerProtocol:
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        server.makeConnection(PeerTransport(ALICE))
        return server

    def test_nothingLive(self) -> None:
        self.assertEqual(self.successResultOf(self.factory.drain(10)), (0, 0))

    def test_finishesInTime(self) -> None:
        server = self.relay()
        d = self.factory.drain(10)
        self.assertNoResult(d)
        server._relayEnded(None)
        self.assertEqual(self.successResultOf(d), (1, 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_abortsTheRest(self) -> None:
        server = self.relay()
        d = self.factory.drain(10)
        self.reactor.advance(10)
        self.assertEqual(self.successResultOf(d), (0, 1))
        self.assertEqual(server.ended, "aborted:shutdown")
        self.assertEqual(self.reactor.readers, set())

    def test_abortsOneBeingRejected(self) -> None:
        self.factory.connectUnix = lambda path: asSocket(FakeDaemonSocket(Credentials(1, 0, 0)))
        server = self.relay()
        transport = server.transport
        self.factory.drain(10)
        self.reactor.advance(10)
        self.assertTrue(transport.aborted)


class ChainTests(SynchronousTestCase):
    """
    A chain of candidate sockets: what passes to the next one, what stops
    at once, and one message for a chain where nothing works.
    """

    chain = ("/run/user/{uid}/docker.sock", "/run/user/{uid}/podman/podman.sock", "/home/{user}/d.sock")

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pending: list[Deferred] = []
        self.lookups = Lookups(self.reactor.seconds, self.inThread, account={1000: Account("alice")}.__getitem__)
        self.factory = RouterFactory(
            self.reactor, Settings(BackendResolver(self.chain, lookups=self.lookups), 5), workers=InlineWorkers()
        )
        self.factory.routerPid = lambda: ROUTER_PID
        self.factory.openSocketFile = self.openSocketFile
        self.factory.openCached = notCached
        self.factory.connectUnix = self.connectUnix
        self.opened: list[str] = []
        self.daemons: list[FakeDaemonSocket] = []
        # path -> what is there: an OSError, or the daemon's credentials.
        self.there: dict[str, object] = {}
        self._daemon: object = None
        # What alice sees: what is there (socketFile's inode), or nothing.
        self.patch(relay, "look", lambda path, viewer: Found(1, 1) if path in self.there else Missing(path))

    def inThread(self, function, key) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d.addCallback(lambda _: function(key))

    def openSocketFile(self, path: str):
        self.opened.append(path)
        what = self.there.get(path, FileNotFoundError(errno.ENOENT, "missing"))
        if isinstance(what, OSError):
            raise what
        if what == "file":
            fd, st = socketFile(1000)
            return fd, os.stat_result((stat.S_IFREG | 0o644,) + tuple(st)[1:])
        if what == "stale":
            self._daemon = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
            return socketFile(1000)
        assert isinstance(what, Credentials)
        self._daemon = what
        return socketFile(what.uid)

    def connectUnix(self, path: str) -> socket.socket:
        if isinstance(self._daemon, OSError):
            raise self._daemon
        assert isinstance(self._daemon, Credentials)
        sock = FakeDaemonSocket(self._daemon)
        self.daemons.append(sock)
        return asSocket(sock)

    def connect(self, client: Credentials = ALICE) -> tuple[ServerProtocol, PeerTransport]:
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        transport = PeerTransport(client)
        server.makeConnection(transport)
        while self.pending:
            self.pending.pop(0).callback(None)
        return server, transport

    def test_missingThenRelayed(self) -> None:
        """
        Nothing at the first path: the second (Podman's) is relayed, and
        the record and the metrics name it.
        """
        self.there["/run/user/1000/podman/podman.sock"] = ALICE_DAEMON
        server, _ = self.connect()
        self.assertIsInstance(server._splicer, Splicer)
        self.assertEqual(self.opened, ["/run/user/1000/docker.sock", "/run/user/1000/podman/podman.sock"])
        self.assertEqual(self.factory.sockets, {"/run/user/{uid}/podman/podman.sock": 1})
        with capturedLogs() as events:
            server._relayEnded(None)
            self.factory.records.flush()
        self.assertEqual([e["backend"] for e in events], ["/run/user/1000/podman/podman.sock"])

    def test_refusedAndNotASocketPassOn(self) -> None:
        self.there["/run/user/1000/docker.sock"] = "stale"
        self.there["/run/user/1000/podman/podman.sock"] = "file"
        self.there["/home/alice/d.sock"] = ALICE_DAEMON
        self.assertIsInstance(self.connect()[0]._splicer, Splicer)
        self.assertEqual(len(self.opened), 3)

    def test_wrongOwnerStops(self) -> None:
        """
        A daemon of another uid at the first path is refused at once: the
        good daemon at the second path is never tried.
        """
        self.there["/run/user/1000/docker.sock"] = Credentials(pid=7, uid=1001, gid=1001)
        self.there["/run/user/1000/podman/podman.sock"] = ALICE_DAEMON
        server, transport = self.connect()
        self.assertIsNone(server._splicer)
        self.assertEqual(self.opened, ["/run/user/1000/docker.sock"])
        server.dataReceived(b"GET /_ping HTTP/1.1\r\n\r\n")
        self.assertIn(b"403 Forbidden", transport.value())
        self.assertEqual(self.factory.results["wrong-owner"], 1)

    def test_loopStops(self) -> None:
        self.there["/run/user/1000/docker.sock"] = Credentials(pid=ROUTER_PID, uid=1000, gid=0)
        self.there["/run/user/1000/podman/podman.sock"] = ALICE_DAEMON
        server, _ = self.connect()
        self.assertEqual((server._splicer, len(self.opened)), (None, 1))

    def test_noneWorked(self) -> None:
        """
        One message lists every path tried and why; it is counted as a
        missing daemon.
        """
        self.there["/run/user/1000/podman/podman.sock"] = "stale"
        server, transport = self.connect()
        server.dataReceived(b"GET /_ping HTTP/1.1\r\n\r\n")
        body = transport.value().decode()
        self.assertIn("503 Service Unavailable", body)
        self.assertIn(
            "No Docker daemon is running for user alice (uid 1000): tried "
            "/run/user/1000/docker.sock: nothing there; "
            "/run/user/1000/podman/podman.sock: refuses connections (a stale socket); "
            "/home/alice/d.sock: nothing there; start your rootless daemon",
            body,
        )
        self.assertEqual(self.factory.results["missing"], 1)

    def test_aLookupHoldsOnlyItsOwnConnection(self) -> None:
        """
        While alice's name is looked up, her connection waits, paused and
        uncounted; bob's (his name known) is relayed meanwhile; then hers.
        """
        bob = Credentials(pid=77, uid=1001, gid=1001)
        self.lookups = Lookups(self.reactor.seconds, self.inThread, account={1000: Account("alice"), 1001: Account("bob")}.__getitem__)
        self.factory.settings.resolver.lookups = self.lookups
        self.there["/run/user/1000/docker.sock"] = ALICE_DAEMON
        self.there["/run/user/1001/docker.sock"] = Credentials(pid=78, uid=1001, gid=1001)
        self.pending.append(Deferred())
        self.pending.pop().callback(None)
        alice = self.factory.buildProtocol(None)
        assert isinstance(alice, ServerProtocol)
        aliceTransport = PeerTransport(ALICE)
        alice.makeConnection(aliceTransport)
        [aliceLookup] = self.pending
        self.pending.clear()
        bobServer, _ = self.connect(bob)  # bob's lookup answers at once
        self.assertIsInstance(bobServer._splicer, Splicer)
        self.assertIsNone(alice._splicer)
        self.assertEqual(aliceTransport.producerState, "paused")
        self.assertEqual(self.factory.relays, {bobServer})
        aliceLookup.callback(None)
        self.assertIsInstance(alice._splicer, Splicer)
        self.assertEqual(self.opened, ["/run/user/1001/docker.sock", "/run/user/1000/docker.sock"])

    def test_clientGoneWhileLookedUp(self) -> None:
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        server.makeConnection(PeerTransport(ALICE))
        with capturedLogs() as events:
            server.connectionLost(Failure(error.ConnectionLost()))
        self.pending.pop().callback(None)
        self.assertEqual((self.opened, events, self.factory.relays), ([], [], set()))

    def test_lookupThatNeverAnswers(self) -> None:
        """
        A user database that hangs holds the client only as long as a
        daemon that does not accept would (the connect timeout), then the
        client is told.
        """
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        transport = PeerTransport(ALICE)
        server.makeConnection(transport)
        self.assertEqual(len(self.pending), 1)
        with capturedLogs():
            self.reactor.advance(self.factory.settings.connectTimeout)
        self.flushLoggedErrors()
        server.dataReceived(b"GET /_ping HTTP/1.1\r\n\r\n")
        self.assertIn(b"could not look up user 1000 (uid 1000) in the user database", transport.value())
        self.assertEqual(self.factory.results["lookup"], 1)
        self.pending.pop().callback(None)  # the answer, late: nothing more happens
        self.assertIsNone(server._splicer)

    def test_lookupFails(self) -> None:
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        transport = PeerTransport(ALICE)
        server.makeConnection(transport)
        with capturedLogs():
            self.pending.pop().errback(OSError("sssd is down"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        server.dataReceived(b"GET /_ping HTTP/1.1\r\n\r\n")
        self.assertIn(b"could not look up user 1000 (uid 1000) in the user database (sssd is down)", transport.value())
        self.assertEqual(self.factory.results["lookup"], 1)


def unforeseen(*args: object, **kwargs: object) -> None:
    """A step that fails in a way nobody foresaw (a bug)."""
    raise RuntimeError("unforeseen")


class FailureTests(RelayHarness):
    """
    An exception in a step of a connection ends that connection the way any
    end does: closed, uncounted, its record kept, the failure logged once
    with its uid.
    """

    def assertEndedAlone(self, server: ServerProtocol, events: Sequence[dict]) -> None:
        self.assertEqual(server.state, State.ENDED)
        self.assertEqual((self.factory.relays, self.factory.userConnections(1000)), (set(), 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        [failure] = [e for e in events if "log_failure" in e]
        self.assertEqual((failure["uid"], failure["log_failure"].getErrorMessage()), (1000, "unforeseen"))
        [record] = [e for e in events if "end" in e]
        self.assertEqual(record["end"], "failed:RuntimeError")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_aTimerRaises(self) -> None:
        """
        A retry for a full backlog (a timer) that raises: the client is
        aborted, and the connection no longer counted.
        """
        self.factory.openCached = self.openSocketFile
        self.connectError = BlockingIOError(errno.EAGAIN, "busy")
        server, clientTransport = self.connectClient()
        self.assertEqual(server.state, State.WAITING_FOR_BACKLOG)
        self.factory.connectUnix = unforeseen  # type: ignore[assignment]
        with capturedLogs() as events:
            self.reactor.advance(0.05)
            self.reactor.advance(ConnectionRecords.interval)
        self.assertTrue(clientTransport.aborted)
        self.assertEndedAlone(server, events)

    def test_aDeferredsCallbackRaises(self) -> None:
        """
        The worker's result (a Deferred) comes back to a step that raises
        once the relay has begun: both sockets are let go.
        """
        workers = self.factory.workers = InlineWorkers(held=True)
        server, clientTransport = self.connectClient()
        self.assertEqual(server.state, State.CONNECTING)
        self.factory.relayed = unforeseen
        with capturedLogs() as events:
            workers.finish()
            self.reactor.advance(ConnectionRecords.interval)
        self.assertTrue(self.daemons[0].closed)
        self.assertEqual(self.reactor.readers, set())
        self.assertEndedAlone(server, events)

    def test_aRefusalRaises(self) -> None:
        """A refusal whose answer can't be written ends all the same."""
        self.connectError = FileNotFoundError(errno.ENOENT, "missing")
        self.patch(self.factory, "rejected", unforeseen)
        with capturedLogs() as events:
            server, clientTransport = self.connectClient()
            self.reactor.advance(ConnectionRecords.interval)
        self.assertTrue(clientTransport.aborted)
        self.assertEqual(server.state, State.ENDED)
        self.assertEqual(self.factory.relays, set())
        [failure] = [e for e in events if "log_failure" in e]
        self.assertEqual(failure["uid"], 1000)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RefusalBoundTests(SynchronousTestCase):
    """
    Refused connections count against the caps while they are answered,
    up to a bound per user; past it they are answered and closed at once.
    """

    def setUp(self) -> None:
        import tomllib

        from dockerrouter.routing.rules import parseRules

        self.reactor = MemoryReactorClock()
        denied = parseRules(tomllib.loads('[[rule]]\nuid = 1000\ndeny = "Not you."\n')["rule"], str)
        self.factory = RouterFactory(
            self.reactor, Settings(BackendResolver("/x/{uid}", rules=denied), 5, maxConnections=10), workers=InlineWorkers()
        )
        self.factory.refusalsPerUser = 2

    def refused(self) -> tuple[ServerProtocol, PeerTransport]:
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        transport = PeerTransport(ALICE)
        server.makeConnection(transport)
        return server, transport

    def test_countedUpToTheBound(self) -> None:
        (first, one), _ = self.refused(), self.refused()
        self.assertEqual(self.factory.userConnections(1000), 2)
        self.assertEqual((one.value(), one.disconnecting), (b"", False))  # waits for the request line
        third, three = self.refused()
        self.assertEqual(self.factory.userConnections(1000), 2)
        self.assertIn(b"403 Forbidden", three.value())
        self.assertIn(b"Not you.", three.value())
        self.assertTrue(three.disconnecting)
        first.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.factory.userConnections(1000), 1)
        self.refused()
        self.assertEqual(self.factory.userConnections(1000), 2)

    def test_whatWasSentIsReadFirst(self) -> None:
        """Past the bound, the request already sent is read, and answered in kind."""
        self.refused(), self.refused()
        server = self.factory.buildProtocol(None)
        assert isinstance(server, ServerProtocol)
        transport = PeerTransport(ALICE)
        transport.getHandle().peer.sendall(b"HEAD /_ping HTTP/1.0\r\n\r\n")
        server.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"HTTP/1.0 403 Forbidden\r\n"), transport.value())
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"), transport.value())  # HEAD: no body
        self.assertTrue(transport.disconnecting)
        # Nothing left unread, to reset the client's read of its answer.
        self.assertRaises(BlockingIOError, transport.getHandle().recv, 1, socket.MSG_DONTWAIT)
