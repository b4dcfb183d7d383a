"""
The error responder answers the request that was sent, then ends cleanly.
"""

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.credentials import Credentials
from dockerrouter.relay.errors import ErrorResponder, renderError
from tests.unit.doubles import PeerTransport


def parse(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    statusLine, *lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    return statusLine, headers, body


class RenderTests(SynchronousTestCase):
    def test_get(self) -> None:
        status, headers, body = parse(renderError(b"GET", b"HTTP/1.1", 503, "no daemon"))
        self.assertEqual(status, b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertEqual(headers[b"Connection"], b"close")
        self.assertEqual(int(headers[b"Content-Length"]), len(body))
        self.assertEqual(json.loads(body), {"message": "no daemon"})

    def test_headHasNoBody(self) -> None:
        status, headers, body = parse(renderError(b"HEAD", b"HTTP/1.1", 503, "no daemon"))
        self.assertEqual(body, b"")
        self.assertGreater(int(headers[b"Content-Length"]), 0)

    def test_oddVersion(self) -> None:
        status, _, _ = parse(renderError(b"GET", b"SPDY/3", 502, "x"))
        self.assertEqual(status, b"HTTP/1.1 502 Bad Gateway")

    def test_unicode(self) -> None:
        _, _, body = parse(renderError(b"GET", b"HTTP/1.0", 502, "Jürgen’s daemon"))
        self.assertEqual(json.loads(body)["message"], "Jürgen’s daemon")


class ResponderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = PeerTransport(Credentials(1, 1, 1))
        self.responder = ErrorResponder(self.clock, self.transport, 503, "gone")

    def test_waitsForTheRequestLine(self) -> None:
        self.responder.dataReceived(b"GET /_ping HT")
        self.assertEqual(self.transport.value(), b"")
        self.responder.dataReceived(b"TP/1.1\r\nHost: docker\r\n\r\n")
        status, _, body = parse(self.transport.value())
        self.assertEqual(status, b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(json.loads(body), {"message": "gone"})
        self.assertTrue(self.transport.writeClosed)
        self.assertFalse(self.transport.disconnecting)

    def test_drainsThenCloses(self) -> None:
        """
        After answering it keeps reading (a request body) until the client
        closes, so the close is not a reset.
        """
        self.responder.dataReceived(b"POST /build HTTP/1.1\r\nContent-Length: 9\r\n\r\n")
        answer = self.transport.value()
        self.responder.dataReceived(b"123456789")
        self.assertEqual(self.transport.value(), answer)
        self.assertFalse(self.transport.disconnecting)
        self.responder.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)

    def test_headMethod(self) -> None:
        self.responder.dataReceived(b"HEAD /_ping HTTP/1.1\r\n\r\n")
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\n"))

    def test_clientSentNothing(self) -> None:
        """
        A client that says nothing still gets its answer after the head timeout.
        """
        self.clock.advance(ErrorResponder.headTimeout - 0.1)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0.1)
        self.assertIn(b"503", self.transport.value())

    def test_requestLineTooLong(self) -> None:
        self.responder.dataReceived(b"GET /" + b"a" * ErrorResponder.maxLineBytes)
        self.assertIn(b"503", self.transport.value())

    def test_withoutWaiting(self) -> None:
        """
        Told not to wait (a client over a cap), it answers at once and lets
        the client drain for a moment only.
        """
        transport = PeerTransport(Credentials(1, 1, 1))
        ErrorResponder(self.clock, transport, 429, "too many", waitForRequest=False)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 429 Too Many Requests"))
        self.assertTrue(transport.writeClosed)
        self.clock.advance(ErrorResponder.hastyDrainTimeout)
        self.assertTrue(transport.aborted)

    def test_eofBeforeHead(self) -> None:
        self.responder.dataReceived(b"GET / HTTP/1.0\r\n")
        self.responder.readConnectionLost()
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.0 503"))

    def test_clientThatNeverCloses(self) -> None:
        """
        A client that neither reads nor closes is cut after the drain timeout.
        """
        self.responder.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.clock.advance(ErrorResponder.drainTimeout)
        self.assertTrue(self.transport.aborted)

    def test_connectionLostCancelsTimers(self) -> None:
        self.responder.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
