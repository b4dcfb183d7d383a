"""
The sites the router serves besides Docker (metrics, the control endpoint):
GETs only, bounded.
"""

from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from dockerrouter.service.web import QuietSite, _AtMost


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
        limited = _AtMost(QuietSite(_Page()), 2)
        first, _ = self.connect(limited)
        second, _ = self.connect(limited)
        third, _ = self.connect(limited)
        self.assertIsNotNone(first)
        self.assertIsNotNone(second)
        self.assertIsNone(third)
        first.connectionLost(None)
        again, _ = self.connect(limited)
        self.assertIsNotNone(again)
