"""
The sites the router serves besides Docker (metrics, the control endpoint):
GETs only, bounded.
"""

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from dockerrouter.service.web import QuietSite, _Bounded


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"ok"


class QuietSiteTests(SynchronousTestCase):
    def connect(self, factory: object) -> tuple:
        protocol = factory.buildProtocol(UNIXAddress(None))  # type: ignore[attr-defined]
        transport = StringTransport()
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def test_getServed(self) -> None:
        protocol, transport = self.connect(QuietSite(_Page()))
        protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.assertTrue(transport.value().endswith(b"ok"))

    def test_bodyRefusedUnread(self) -> None:
        """
        A request with a body (which Twisted would spool to a temporary file,
        whatever its size) ends the connection as soon as its head says so:
        the transport reads no more of it.
        """
        for head in (b"Content-Length: 1000000000", b"Transfer-Encoding: chunked"):
            protocol, transport = self.connect(QuietSite(_Page()))
            protocol.dataReceived(b"POST /metrics HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n")
            self.assertTrue(transport.disconnecting, head)
            self.assertEqual(transport.value(), b"", head)

    def test_connectionsPastTheLimitTurnedAway(self) -> None:
        limited = _Bounded(QuietSite(_Page()), 2, Clock())
        first, _ = self.connect(limited)
        second, _ = self.connect(limited)
        third, _ = self.connect(limited)
        self.assertIsNotNone(first)
        self.assertIsNotNone(second)
        self.assertIsNone(third)
        first.connectionLost(None)
        again, _ = self.connect(limited)
        self.assertIsNotNone(again)

    def test_connectionsPastThePeersBoundTurnedAway(self) -> None:
        """
        One peer (here an address) holds at most the site's
        C{connectionsPerPeer}; another is served beside it.
        """
        site = QuietSite(_Page())
        site.connectionsPerPeer = 2
        limited = _Bounded(site, 64, Clock())

        def connect(host: str) -> tuple:
            protocol = limited.buildProtocol(IPv4Address("TCP", host, 1234))
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1234))
            protocol.makeConnection(transport)
            return protocol, transport

        first, _ = connect("127.0.0.1")
        connect("127.0.0.1")
        _, turnedAway = connect("127.0.0.1")
        self.assertTrue(turnedAway.disconnecting)
        other, served = connect("127.0.0.2")
        other.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", served.value())
        first.connectionLost(Failure(ConnectionDone()))
        _, again = connect("127.0.0.1")
        self.assertFalse(again.disconnecting)

    def test_requestDeadline(self) -> None:
        """
        A request trickling in is cut at the deadline, however often a
        byte comes; one that arrived whole in time is answered and kept.
        """
        clock = Clock()
        site = QuietSite(_Page())
        limited = _Bounded(site, 64, clock)
        slow, slowTransport = self.connect(limited)
        quick, quickTransport = self.connect(limited)
        for byte in b"GET /metrics HTTP/1.1\r\n":
            clock.advance(site.requestDeadline / 30)
            slow.dataReceived(bytes([byte]))
            self.assertFalse(slowTransport.disconnecting)
        quick.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(site.requestDeadline)
        self.assertTrue(slowTransport.disconnecting)
        self.assertFalse(quickTransport.disconnecting)
        self.assertIn(b"200 OK", quickTransport.value())
        # The next request on the kept connection has its own deadline.
        quick.dataReceived(b"GET")
        clock.advance(site.requestDeadline)
        self.assertTrue(quickTransport.disconnecting)
