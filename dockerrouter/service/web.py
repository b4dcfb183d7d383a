"""
What the router serves over HTTP besides Docker (metrics, the control
endpoint): sites with no access log, on endpoints that are nice to have.

Neither is worth stopping the router for: if an endpoint can't be had
(taken by another router, a missing directory, a socket systemd did not hand
over, a description that does not parse), the router warns and serves Docker
without it.
"""

import errno
import socket
from typing import Any, Hashable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, ISystemHandle
from twisted.python.failure import Failure
from twisted.web import http
from twisted.internet.interfaces import IAddress
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dockerrouter.base.logging import RouterLogger
from dockerrouter.routing.credentials import peerCredentials


class _WithoutBody(Request):
    """
    A request that may carry no body: both sites answer GETs only, and
    Twisted would spool a body of any size to a temporary file (a metrics
    socket on 127.0.0.1 is open to every local user).
    """

    def gotLength(self, length: Optional[int]) -> None:
        if length != 0:  # None: chunked
            # Stops reading at once; nothing is owed to the client.
            assert self.channel.transport is not None
            self.channel.transport.loseConnection()
            length = 0
        super().gotLength(length)


class QuietSite(Site):
    """
    A site that writes no log line per request (a scrape every 15 s), takes
    no request body, and drops a connection idle for a minute.
    """

    noisy = False
    requestFactory = _WithoutBody
    # How many connections a site serves at once: a scraper or two, an
    # admin's status command.
    connectionLimit = 64
    # How many of them one peer may hold (a uid for a Unix client, an
    # address for TCP): a metrics socket is open to every local user.
    connectionsPerPeer = 8
    # Seconds a request may take to arrive whole, however it trickles in
    # (the idle timeout restarts with every byte).
    requestDeadline = 10.0

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource, timeout=60)

    def log(self, request: http.Request) -> None:
        pass


def _peerOf(transport: Any) -> Hashable:
    """
    Who is at the other end of C{transport}: the uid of a Unix client, as
    the kernel tells it, else the host of its address.
    """
    handle = ISystemHandle(transport).getHandle() if ISystemHandle.providedBy(transport) else None
    if isinstance(handle, socket.socket) and handle.family == socket.AF_UNIX:
        return ("uid", peerCredentials(handle).uid)
    return ("host", getattr(transport.getPeer(), "host", None))


class _BoundedConnection(ProtocolWrapper):
    """
    One connection of a L{_Bounded} site: turned away past its peer's
    bound, and aborted when a request takes longer than the site's
    deadline to arrive (from the connection's start, or from the first
    byte after an answer).
    """

    factory: "_Bounded"
    # A stream connection (loseConnection, abortConnection).
    transport: Any
    _peer: Optional[Hashable] = None
    _deadline: Optional[IDelayedCall] = None

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        peer = _peerOf(transport)
        if not self.factory.admitPeer(peer):
            self.transport.loseConnection()
            return
        self._peer = peer
        self._startDeadline()

    def _startDeadline(self) -> None:
        self._deadline = self.factory.reactor.callLater(
            self.factory.wrappedFactory.requestDeadline, self._tooSlow
        )

    def _tooSlow(self) -> None:
        self._deadline = None
        self.transport.abortConnection()

    def _stopDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and self._peer is not None:
            self._startDeadline()  # the next request begins
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        self._stopDeadline()  # answered: the request had come whole
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self._stopDeadline()
        super().writeSequence(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopDeadline()
        if self._peer is not None:
            self.factory.releasePeer(self._peer)
        super().connectionLost(reason)


class _Bounded(WrappingFactory):
    """
    A site's factory that turns away connections past C{limit} in all, or
    past the site's C{connectionsPerPeer} for one peer, and gives each
    request the site's C{requestDeadline}: no one local user can hold the
    site by opening connections or trickling bytes into them.
    """

    noisy = False
    protocol = _BoundedConnection
    wrappedFactory: QuietSite

    def __init__(self, site: QuietSite, limit: int, reactor: IReactorTime) -> None:
        super().__init__(site)
        self.limit = limit
        self.reactor = reactor
        self._perPeer: dict[Hashable, int] = {}

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[ProtocolWrapper]:  # type: ignore[override]  # None turns a connection away, as Factory allows
        if len(self.protocols) >= self.limit:
            return None  # Twisted closes the connection
        return super().buildProtocol(addr)

    def admitPeer(self, peer: Hashable) -> bool:
        """Count a connection of C{peer}, if it has room."""
        held = self._perPeer.get(peer, 0)
        if held >= self.wrappedFactory.connectionsPerPeer:
            return False
        self._perPeer[peer] = held + 1
        return True

    def releasePeer(self, peer: Hashable) -> None:
        self._perPeer[peer] -= 1
        if not self._perPeer[peer]:
            del self._perPeer[peer]


class OptionalListener(Service):
    """
    Serves a site on an endpoint if it can be had, and warns if not.
    """

    log = RouterLogger()
    _port: Optional[IListeningPort] = None

    # A reactor: core (endpoints) and time (request deadlines).
    def __init__(self, description: str, reactor: Any, site: QuietSite, what: str) -> None:
        self.description = description
        self._reactor = reactor
        self._site = site
        self._what = what

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            limited = _Bounded(self._site, self._site.connectionLimit, self._reactor)
            waiting = serverFromString(self._reactor, self.description).listen(limited)
        except Exception:
            waiting = Failure()
        if isinstance(waiting, Failure):
            self._cannot(waiting)
        else:
            waiting.addCallbacks(self._listening, self._cannot)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port

    def _cannot(self, failure: Failure) -> None:
        reason = getattr(failure.value, "socketError", None) or failure.value
        if reason == "Cannot acquire lock":
            reason = "another docker-router serves it"
        elif getattr(reason, "errno", None) == errno.ENOENT:
            reason = "its directory does not exist"
        elif failure.check(KeyError, IndexError) and self.description.startswith("systemd:"):
            reason = "systemd handed over no such socket"
        self.log.warn(
            "not serving {what} on {endpoint}: {reason}",
            what=self._what,
            endpoint=self.description,
            reason=reason,
        )

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None
