"""
One client connection: who it is, the daemon it may reach, and the relay
between them.

The L{ServerProtocol} owns the connection from start to end: it reads the
client's credentials, holds the client's bytes in the kernel until there is
somewhere to send them, connects a L{ClientProtocol} to the backend, verifies
the daemon it reached, and only then pairs the two halves.  When the backend
can't be used, an L{ErrorResponder} answers instead.  Where the backend is and
what makes it acceptable is the factory's resolver's and C{verifyDaemon}'s
business; this module only moves bytes.
"""

import os
from typing import Optional, Set

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dockerrouter.backends import (
    Backend,
    BackendResolver,
    BackendUnusable,
    explainConnectFailure,
    verifyDaemon,
)
from dockerrouter.credentials import Credentials, peerCredentials
from dockerrouter.errors import ErrorResponder
from dockerrouter.logging import CONNECTION_DONE, REJECTED, RouterLogger


@implementer(IHalfCloseableProtocol)
class _RelayHalf(Protocol):
    """
    One side of a relay: forwards what it reads to the other side, counts it,
    and passes end-of-file on as a half-close, so that a client's
    C{shutdown(SHUT_WR)} (the end of C{docker run -i}'s stdin) reaches the
    daemon while the daemon's output keeps flowing back.  The connection
    closes once both of its directions are done.
    """

    peer: Optional["_RelayHalf"] = None
    bytesForwarded = 0
    readDone = False
    writeDone = False

    def dataReceived(self, data: bytes) -> None:
        self.bytesForwarded += len(data)
        self.peer.transport.write(data)

    def readConnectionLost(self) -> None:
        # The peer resuming us as its producer makes the reactor read EOF
        # again; pass it on once.
        if self.readDone:
            return
        self.readDone = True
        self.peer.transport.loseWriteConnection()
        self._closeWhenDone()

    def writeConnectionLost(self) -> None:
        self.writeDone = True
        self._closeWhenDone()

    def _closeWhenDone(self) -> None:
        if self.readDone and self.writeDone:
            self.transport.loseConnection()

    def _endPeer(self, reason: Failure) -> None:
        """This side is gone: a clean end lets the peer flush, any other ends it now."""
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.disconnected:
            return
        if reason.check(error.ConnectionDone):
            peer.transport.loseConnection()
        else:
            peer.transport.abortConnection()


class ClientProtocol(_RelayHalf):
    """
    The router's connection to a user's daemon.
    """

    def __init__(self, server: "ServerProtocol") -> None:
        self.server = server

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:
        self._endPeer(reason)
        self.server.backendLost(reason)


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, server: "ServerProtocol") -> None:
        self.server = server

    def buildProtocol(self, addr: object) -> ClientProtocol:
        return ClientProtocol(self.server)


class ServerProtocol(_RelayHalf):
    """
    The client's connection to the router, and the owner of the relay.
    """

    log = RouterLogger()
    factory: "RouterFactory"

    client: Credentials
    backend: Optional[Backend] = None
    peer: Optional[ClientProtocol] = None
    ended = "closed"
    _connecting: Optional[Deferred] = None
    _responder: Optional[ErrorResponder] = None
    _clientGone = False
    _openSides = 1

    def connectionMade(self) -> None:
        # Don't read until there is somewhere to send it: the kernel keeps
        # the client's first bytes until the backend is connected and verified.
        self.transport.pauseProducing()
        self.startedAt = self.factory.reactor.seconds()
        self.client = peerCredentials(self.transport.getHandle())
        self.factory.relays.add(self)
        self.backend = self.factory.resolver.resolve(self.client)
        endpoint = UNIXClientEndpoint(
            self.factory.reactor, self.backend.path, timeout=self.factory.connectTimeout
        )
        self._connecting = endpoint.connect(_BackendFactory(self))
        self._connecting.addCallbacks(self._backendConnected, self._backendFailed)

    def _backendConnected(self, backendProtocol: ClientProtocol) -> None:
        self._connecting = None
        self._openSides += 1
        try:
            daemon = peerCredentials(backendProtocol.transport.getHandle())
            verifyDaemon(self.backend, daemon, self.factory.routerPid())
        except BackendUnusable as reason:
            backendProtocol.transport.abortConnection()
            self._reject(reason)
            return
        self.peer = backendProtocol
        backendProtocol.peer = self
        # Backpressure: each transport is the streaming producer of the other,
        # so a slow reader on either side pauses reading from the fast one and
        # the router never buffers more than a socket's worth per direction.
        self.transport.registerProducer(backendProtocol.transport, True)
        backendProtocol.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()

    def _backendFailed(self, reason: Failure) -> None:
        self._connecting = None
        if self._clientGone:
            return  # the client left (or shutdown aborted it) while we waited
        self._reject(
            explainConnectFailure(self.backend, reason.value, self.factory.connectTimeout)
        )

    def _reject(self, reason: BackendUnusable) -> None:
        self.ended = "rejected:" + reason.cause
        self.log.warn(
            REJECTED,
            uid=self.client.uid,
            user=self.backend.user,
            pid=self.client.pid,
            backend=self.backend.path,
            cause=reason.cause,
            message=reason.message,
        )
        if self._clientGone:
            return
        self._responder = ErrorResponder(
            self.factory.reactor, self.transport, reason.status, reason.message
        )
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._responder is not None:
            self._responder.dataReceived(data)
        else:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        if self._responder is not None:
            self._responder.readConnectionLost()
        else:
            super().readConnectionLost()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:
        self._clientGone = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._responder is not None:
            self._responder.connectionLost()
        if not reason.check(error.ConnectionDone) and self.ended == "closed":
            self.ended = "client:" + type(reason.value).__name__
        self._endPeer(reason)
        self._sideClosed()

    def backendLost(self, reason: Failure) -> None:
        if not reason.check(error.ConnectionDone) and self.ended == "closed":
            self.ended = "docker:" + type(reason.value).__name__
        self._sideClosed()

    def abort(self, why: str) -> None:
        """End this relay now, both sides (graceful shutdown ran out of time)."""
        self.ended = why
        self.transport.abortConnection()

    def _sideClosed(self) -> None:
        self._openSides -= 1
        if self._openSides:
            return
        self.factory.relays.discard(self)
        self.log.info(
            CONNECTION_DONE,
            uid=self.client.uid,
            user=self.backend.user,
            pid=self.client.pid,
            backend=self.backend.path,
            duration=self.factory.reactor.seconds() - self.startedAt,
            bytesToDocker=self.bytesForwarded,
            bytesFromDocker=self.peer.bytesForwarded if self.peer else 0,
            end=self.ended,
        )
        self.factory.relayEnded(self)


class RouterFactory(Factory):
    """
    Builds a L{ServerProtocol} per client and keeps the live ones, so that a
    shutdown can let them finish.
    """

    noisy = False
    protocol = ServerProtocol
    # Asked per connection, not remembered: twistd forks after makeService.
    routerPid = staticmethod(os.getpid)

    def __init__(self, reactor, resolver: BackendResolver, connectTimeout: float) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.connectTimeout = connectTimeout
        self.relays: Set[ServerProtocol] = set()
        self._whenIdle: list[Deferred] = []

    def relayEnded(self, relay: ServerProtocol) -> None:
        if not self.relays:
            waiting, self._whenIdle = self._whenIdle, []
            for d in waiting:
                d.callback(None)

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
            return live - aborted[0], aborted[0]

        return idle.addCallback(done)
