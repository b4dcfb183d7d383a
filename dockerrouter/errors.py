"""
Tells a client, in the Docker API's own words, why its daemon can't be
reached.

The docker CLI prints C{Error response from daemon: <message>} for any HTTP
error whose JSON body has a C{message}, and the Docker SDK raises C{APIError}
with it; a dropped connection would only say "connection reset by peer".  So
the responder reads the request head first (bounded in size and time),
answers, and then closes without a reset: it shuts its write side and drains
whatever the client still sends until the client closes, because closing a
Unix socket with unread data makes the client's next read fail with
C{ECONNRESET}.
"""

import json
from http import HTTPStatus

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport

_END_OF_HEAD = b"\r\n\r\n"


def renderError(method: bytes, version: bytes, status: int, message: str) -> bytes:
    """
    A complete HTTP response carrying C{message} as a Docker API error.
    """
    body = json.dumps({"message": message}).encode("utf-8") + b"\n"
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        version = b"HTTP/1.1"
    head = (
        f"{version.decode()} {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    return head if method == b"HEAD" else head + body


class ErrorResponder:
    """
    Answers one client with one error, then ends the connection cleanly.

    It is fed by the protocol that owns the client transport (which has
    already resumed reading): C{dataReceived} and C{readConnectionLost}.
    """

    maxHeadBytes = 64 * 1024
    headTimeout = 10.0
    drainTimeout = 10.0

    def __init__(
        self, reactor: IReactorTime, transport: ITransport, status: int, message: str
    ) -> None:
        self._transport = transport
        self._status = status
        self._message = message
        self._head = b""
        self._answered = False
        self._deadline: IDelayedCall = reactor.callLater(
            self.headTimeout, self._answer
        )
        self._reactor = reactor

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return  # draining: the request body or a pipelined request
        self._head += data
        if _END_OF_HEAD in self._head or len(self._head) >= self.maxHeadBytes:
            self._answer()

    def readConnectionLost(self) -> None:
        """The client sent all it will: answer now, or finish draining."""
        if self._answered:
            self._finish()
        else:
            self._answer()

    def connectionLost(self) -> None:
        if self._deadline.active():
            self._deadline.cancel()

    def _answer(self) -> None:
        self._answered = True
        requestLine = self._head.split(b"\r\n", 1)[0].split()
        method = requestLine[0] if requestLine else b"GET"
        version = requestLine[2] if len(requestLine) == 3 else b"HTTP/1.1"
        self._head = b""
        self._transport.write(renderError(method, version, self._status, self._message))
        self._transport.loseWriteConnection()
        if self._deadline.active():
            self._deadline.cancel()
        # A client that neither reads nor closes must not hold us forever.
        self._deadline = self._reactor.callLater(self.drainTimeout, self._abort)

    def _finish(self) -> None:
        if self._deadline.active():
            self._deadline.cancel()
        self._transport.loseConnection()

    def _abort(self) -> None:
        self._transport.abortConnection()
