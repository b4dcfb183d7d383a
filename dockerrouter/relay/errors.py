"""
Tells a client, in the Docker API's own words, why its daemon can't be
reached.

The docker CLI prints C{Error response from daemon: <message>} for any HTTP
error whose JSON body has a C{message}, and the Docker SDK raises C{APIError}
with it; a dropped connection would only say "connection reset by peer".  So
the responder reads the request line first (bounded in size and time),
answers, and then closes without a reset: it shuts its write side and drains
whatever the client still sends until the client closes, because closing a
Unix socket with unread data makes the client's next read fail with
C{ECONNRESET}.
"""

import json
import socket
from http import HTTPStatus

from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime



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


def answerAndClose(
    # A Unix server connection (getHandle, write, loseConnection).
    transport: Any,
    status: int,
    message: str,
) -> None:
    """
    Answer with C{message} and close at once, for a client past its user's
    bound of refusals being answered (see L{ErrorResponder} for the others):
    a flood of them must not hold descriptors.  What the client has sent so
    far is read first (and its request line answered in kind), so that a
    client that sent its request reads the answer and a clean EOF, not a
    reset.
    """
    sent = bytearray()
    handle = transport.getHandle()
    try:
        while len(sent) < ErrorResponder.maxLineBytes:
            more = handle.recv(ErrorResponder.maxLineBytes, socket.MSG_DONTWAIT)
            if not more:
                break
            sent += more
    except OSError:
        pass  # nothing more now (EAGAIN), or gone
    method, version = requestLine(bytes(sent))
    transport.write(renderError(method, version, status, message))
    transport.loseConnection()


def requestLine(received: bytes) -> tuple[bytes, bytes]:
    """The method and version of the request C{received} starts with (defaults where it says none)."""
    words = received.split(b"\n", 1)[0].split()
    method = words[0] if words else b"GET"
    version = words[2] if len(words) == 3 else b"HTTP/1.1"
    return method, version


class ErrorResponder:
    """
    Answers one client with one error, then ends the connection cleanly.

    It answers as soon as it has the request line (the method says whether
    a body may follow, the version how to answer), or after C{headTimeout}
    if none comes, or at once when told not to wait: a client turned away
    over a cap must not hold a descriptor while it makes up its mind.

    It is fed by the protocol that owns the client transport (which has
    already resumed reading): C{dataReceived} and C{readConnectionLost}.
    """

    maxLineBytes = 8 * 1024
    headTimeout = 5.0
    drainTimeout = 10.0
    hastyDrainTimeout = 1.0

    def __init__(
        self,
        reactor: IReactorTime,
        # A connection that can also half-close and abort (no one interface
        # says all three).
        transport: Any,
        status: int,
        message: str,
        waitForRequest: bool = True,
    ) -> None:
        self._reactor = reactor
        self._transport = transport
        self._status = status
        self._message = message
        self._line = b""
        self._answered = False
        self._deadline: Optional[IDelayedCall] = None
        if waitForRequest:
            self._deadline = reactor.callLater(self.headTimeout, self._answer)
        else:
            self._answer(self.hastyDrainTimeout)

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return  # draining: the rest of the request, a body, a pipelined one
        self._line += data
        if b"\n" in self._line or len(self._line) >= self.maxLineBytes:
            self._answer()

    def readConnectionLost(self) -> None:
        """The client sent all it will: answer now, or finish draining."""
        if self._answered:
            self._stopTimer()
            self._transport.loseConnection()
        else:
            self._answer()

    def connectionLost(self) -> None:
        self._stopTimer()

    def _answer(self, drainTimeout: Optional[float] = None) -> None:
        self._answered = True
        method, version = requestLine(self._line)
        self._line = b""
        self._transport.write(renderError(method, version, self._status, self._message))
        self._transport.loseWriteConnection()
        self._stopTimer()
        # A client that neither reads nor closes must not hold us forever.
        self._deadline = self._reactor.callLater(
            drainTimeout or self.drainTimeout, self._transport.abortConnection
        )

    def _stopTimer(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
