"""
The relay's protocol logic, driven without sockets: pausing, verification
before pairing, producers, half-close, counts, records and the drain.
"""

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.backends import BackendResolver
from dockerrouter.credentials import Credentials
from dockerrouter.relay import RouterFactory, ServerProtocol
from tests.unit.doubles import PeerTransport

ALICE = Credentials(pid=4242, uid=1000, gid=1000)
ALICE_DAEMON = Credentials(pid=5000, uid=1000, gid=1000)
ROUTER_PID = 99


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

    def test_pausesUntilVerified(self) -> None:
        """
        The client is not read until the backend is connected and verified;
        then the two are each other's producers and the client is resumed.
        """
        server, clientTransport = self.connectClient()
        self.assertEqual(clientTransport.producerState, "paused")
        [(path, _, timeout, _)] = self.reactor.unixClients
        self.assertEqual((path, timeout), ("/run/user/1000/docker.sock", 5))
        backend, backendTransport = self.connectBackend()
        self.assertEqual(clientTransport.producerState, "producing")
        self.assertIs(clientTransport.producer, backendTransport)
        self.assertIs(backendTransport.producer, clientTransport)
        self.assertTrue(clientTransport.streaming and backendTransport.streaming)

    def test_forwardsAndCounts(self) -> None:
        server, clientTransport = self.connectClient()
        backend, backendTransport = self.connectBackend()
        server.dataReceived(b"GET /_ping HTTP/1.1\r\n\r\n")
        backend.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nOK")
        backend.dataReceived(b"!")
        self.assertEqual(backendTransport.value(), b"GET /_ping HTTP/1.1\r\n\r\n")
        self.assertEqual(clientTransport.value(), b"HTTP/1.1 200 OK\r\n\r\nOK!")
        self.assertEqual(server.bytesForwarded, 23)
        self.assertEqual(backend.bytesForwarded, 22)

    def test_wrongOwnerGetsNoByte(self) -> None:
        """
        A daemon running as another uid is dropped before any client byte
        reaches it, and the client is told why.
        """
        server, clientTransport = self.connectClient()
        with capturedLogs() as events:
            backend, backendTransport = self.connectBackend(Credentials(pid=1, uid=0, gid=0))
        self.assertTrue(backendTransport.aborted)
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
        _, wrappingFactory, _, _ = self.reactor.unixClients[-1]
        wrappingFactory.clientConnectionFailed(None, Failure(error.TimeoutError()))
        server.dataReceived(b"GET /version HTTP/1.1\r\n\r\n")
        self.assertIn(b"504 Gateway Timeout", clientTransport.value())

    def test_halfCloseEachWay(self) -> None:
        """
        End-of-file on one side is a half-close of the other; each side
        closes once both its directions are done.
        """
        server, clientTransport = self.connectClient()
        backend, backendTransport = self.connectBackend()
        server.readConnectionLost()
        self.assertTrue(backendTransport.writeClosed)
        self.assertFalse(clientTransport.writeClosed)
        backend.dataReceived(b"output after stdin closed")
        self.assertEqual(clientTransport.value(), b"output after stdin closed")
        backend.writeConnectionLost()
        self.assertFalse(backendTransport.disconnecting)
        backend.readConnectionLost()
        self.assertTrue(clientTransport.writeClosed)
        self.assertTrue(backendTransport.disconnecting)
        server.writeConnectionLost()
        self.assertTrue(clientTransport.disconnecting)

    def test_repeatedEndOfFile(self) -> None:
        """
        Resumed as a producer after EOF, a transport reports EOF again; the
        relay passes it on once.
        """
        server, _ = self.connectClient()
        backend, backendTransport = self.connectBackend()
        server.readConnectionLost()
        backendTransport.writeClosed = False
        server.readConnectionLost()
        self.assertFalse(backendTransport.writeClosed)

    def test_resetEndsTheOtherSide(self) -> None:
        server, clientTransport = self.connectClient()
        backend, backendTransport = self.connectBackend()
        server.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(backendTransport.aborted)

    def test_oneRecordWithTrueCounts(self) -> None:
        server, clientTransport = self.connectClient()
        backend, backendTransport = self.connectBackend()
        server.dataReceived(b"x" * 1000)
        backend.dataReceived(b"y" * 70)
        self.reactor.advance(2.5)
        with capturedLogs() as events:
            server.connectionLost(Failure(error.ConnectionDone()))
            self.assertEqual(events, [])
            backend.connectionLost(Failure(error.ConnectionDone()))
        [record] = events
        self.assertEqual(
            {k: record[k] for k in ("uid", "user", "pid", "backend", "bytesToDocker", "bytesFromDocker", "end", "duration")},
            {
                "uid": 1000,
                "user": "alice",
                "pid": 4242,
                "backend": "/run/user/1000/docker.sock",
                "bytesToDocker": 1000,
                "bytesFromDocker": 70,
                "end": "closed",
                "duration": 2.5,
            },
        )
        self.assertEqual(self.factory.relays, set())

    def test_clientLeavesWhileConnecting(self) -> None:
        server, clientTransport = self.connectClient()
        [connector] = self.reactor.connectors
        with capturedLogs() as events:
            server.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(connector.stoppedConnecting, True)
        self.assertEqual([e["end"] for e in events], ["client:ConnectionLost"])
        self.assertEqual(self.factory.relays, set())


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
