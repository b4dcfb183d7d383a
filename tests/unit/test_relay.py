"""
The relay's protocol logic, driven without sockets: pausing, verification
before anything moves, connect retries, rejection, records and the drain.
(What moves bytes is tested over real sockets in L{tests.unit.test_sockets}.)
"""

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.backends import BackendResolver
from dockerrouter.credentials import Credentials
from dockerrouter.relay import RouterFactory, ServerProtocol
from dockerrouter.splice import Splicer
from tests.unit.doubles import PeerTransport

ALICE = Credentials(pid=4242, uid=1000, gid=1000)
ALICE_DAEMON = Credentials(pid=5000, uid=1000, gid=1000)
ROUTER_PID = 99

# What Twisted reports for a non-blocking Unix connect to a full backlog.
BACKLOG_FULL = error.ConnectError(string=Failure(error.ConnectionDone()))


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = RouterFactory(
            self.reactor,
            BackendResolver("/run/user/{uid}/docker.sock", lookupName={1000: "alice"}.get),
            connectTimeout=5,
        )
        self.factory.routerPid = lambda: ROUTER_PID

    def connectClient(self) -> tuple[ServerProtocol, PeerTransport]:
        server = self.factory.buildProtocol(None)
        transport = PeerTransport(ALICE)
        server.makeConnection(transport)
        return server, transport

    def connectBackend(self, daemon: Credentials = ALICE_DAEMON):
        """Let the pending backend connection succeed, to a daemon running as C{daemon}."""
        _, wrappingFactory, _, _ = self.reactor.unixClients[-1]
        protocol = wrappingFactory.buildProtocol(None)
        transport = PeerTransport(daemon)
        protocol.makeConnection(transport)
        return protocol._wrappedProtocol, transport

    def failBackend(self, reason: Exception) -> None:
        _, wrappingFactory, _, _ = self.reactor.unixClients[-1]
        wrappingFactory.clientConnectionFailed(None, Failure(reason))

    def test_pausesUntilVerified(self) -> None:
        """
        The client is not read until the backend is connected and verified;
        then the splicer takes both sockets and Twisted reads neither.
        """
        server, clientTransport = self.connectClient()
        self.assertEqual(clientTransport.producerState, "paused")
        self.assertEqual(self.reactor.readers, set())
        [(path, _, timeout, _)] = self.reactor.unixClients
        self.assertEqual((path, timeout), ("/run/user/1000/docker.sock", 5))
        backend, backendTransport = self.connectBackend()
        self.assertEqual(clientTransport.producerState, "paused")
        self.assertFalse(backendTransport.reading)
        self.assertIsInstance(server._splicer, Splicer)
        self.assertEqual(
            {r.fileno() for r in self.reactor.readers},
            {clientTransport.getHandle().fd, backendTransport.getHandle().fd},
        )

    def test_wrongOwnerGetsNoByte(self) -> None:
        """
        A daemon running as another uid is dropped before anything is relayed,
        and the client is told why.
        """
        server, clientTransport = self.connectClient()
        with capturedLogs() as events:
            backend, backendTransport = self.connectBackend(Credentials(pid=1, uid=0, gid=0))
        self.assertTrue(backendTransport.aborted)
        self.assertIsNone(server._splicer)
        self.assertEqual(self.reactor.readers, set())
        self.assertEqual(clientTransport.producerState, "producing")
        server.dataReceived(b"GET /containers/json HTTP/1.1\r\n\r\n")
        self.assertEqual(backendTransport.value(), b"")
        self.assertIn(b"403 Forbidden", clientTransport.value())
        self.assertIn(b"runs as uid 0", clientTransport.value())
        [warning] = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual((warning["cause"], warning["uid"]), ("wrong-owner", 1000))

    def test_routerLoop(self) -> None:
        server, clientTransport = self.connectClient()
        self.connectBackend(Credentials(pid=ROUTER_PID, uid=1000, gid=0))
        server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertIn(b"leads back to docker-router", clientTransport.value())

    def test_connectFailure(self) -> None:
        server, clientTransport = self.connectClient()
        self.failBackend(error.TimeoutError())
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"504 Gateway Timeout", clientTransport.value())

    def test_fullBacklogIsRetriedUntilTheTimeout(self) -> None:
        """
        A daemon too busy to take the connection is tried again within the
        connect timeout, then reported as a timeout.
        """
        server, clientTransport = self.connectClient()
        self.failBackend(BACKLOG_FULL)
        self.assertEqual(len(self.reactor.unixClients), 1)
        self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.unixClients), 2)
        self.assertAlmostEqual(self.reactor.unixClients[-1][2], 4.95)
        self.reactor.advance(4.95)
        attempts = len(self.reactor.unixClients)
        self.failBackend(BACKLOG_FULL)
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.unixClients), attempts)
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"within 5 seconds", clientTransport.value())

    def test_fullBacklogThenConnected(self) -> None:
        server, clientTransport = self.connectClient()
        self.failBackend(BACKLOG_FULL)
        self.reactor.advance(0.05)
        self.connectBackend()
        self.assertIsInstance(server._splicer, Splicer)

    def test_clientLeavesDuringRetry(self) -> None:
        server, _ = self.connectClient()
        self.failBackend(BACKLOG_FULL)
        server.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.factory.relays, set())

    def test_clientLeavesWhileConnecting(self) -> None:
        server, clientTransport = self.connectClient()
        [connector] = self.reactor.connectors
        with capturedLogs() as events:
            server.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(connector.stoppedConnecting, True)
        self.assertEqual([e["end"] for e in events], ["client:ConnectionLost"])
        self.assertEqual(self.factory.relays, set())

    def test_oneRecordPerConnection(self) -> None:
        server, clientTransport = self.connectClient()
        backend, backendTransport = self.connectBackend()
        self.reactor.advance(2.5)
        with capturedLogs() as events:
            server._relayEnded(None)
            self.assertTrue(clientTransport.disconnecting and backendTransport.disconnecting)
            server.connectionLost(Failure(error.ConnectionDone()))
            self.assertEqual(events, [])
            backend.connectionLost(Failure(error.ConnectionDone()))
        [record] = events
        self.assertEqual(
            {k: record[k] for k in ("uid", "user", "pid", "backend", "end", "duration")},
            {
                "uid": 1000,
                "user": "alice",
                "pid": 4242,
                "backend": "/run/user/1000/docker.sock",
                "end": "closed",
                "duration": 2.5,
            },
        )
        self.assertEqual(self.factory.relays, set())

    def test_failedSideAbortsBoth(self) -> None:
        server, clientTransport = self.connectClient()
        backend, backendTransport = self.connectBackend()
        server._relayEnded("docker:ECONNRESET")
        self.assertTrue(clientTransport.aborted and backendTransport.aborted)
        self.assertEqual(server.ended, "docker:ECONNRESET")


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = RouterFactory(
            self.reactor, BackendResolver("/x/{uid}"), connectTimeout=5
        )
        self.factory.routerPid = lambda: ROUTER_PID

    def test_nothingLive(self) -> None:
        self.assertEqual(self.successResultOf(self.factory.drain(10)), (0, 0))

    def test_finishesInTime(self) -> None:
        server = self.factory.buildProtocol(None)
        server.makeConnection(PeerTransport(ALICE))
        d = self.factory.drain(10)
        self.assertNoResult(d)
        server.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(d), (1, 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_abortsTheRest(self) -> None:
        server = self.factory.buildProtocol(None)
        transport = PeerTransport(ALICE)
        server.makeConnection(transport)
        d = self.factory.drain(10)
        self.reactor.advance(10)
        self.assertTrue(transport.aborted)
        server.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(self.successResultOf(d), (0, 1))
        self.assertEqual(server.ended, "aborted:shutdown")
