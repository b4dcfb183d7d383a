"""
What the router serves over HTTP besides Docker (metrics, the control
endpoint): sites with no access log, on endpoints that are nice to have.

Neither is worth stopping the router for: if an endpoint can't be had
(taken by another router, a missing directory, a socket systemd did not hand
over, a description that does not parse), the router warns and serves Docker
without it.
"""

import errno
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.python.failure import Failure
from twisted.web import http
from twisted.internet.interfaces import IAddress
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dockerrouter.base.logging import RouterLogger


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

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource, timeout=60)

    def log(self, request: http.Request) -> None:
        pass


class _AtMost(WrappingFactory):
    """A site's factory that turns away connections past C{limit}."""

    noisy = False

    def __init__(self, site: Site, limit: int) -> None:
        super().__init__(site)
        self.limit = limit

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[ProtocolWrapper]:  # type: ignore[override]  # None turns a connection away, as Factory allows
        if len(self.protocols) >= self.limit:
            return None  # Twisted closes the connection
        return super().buildProtocol(addr)


class OptionalListener(Service):
    """
    Serves a site on an endpoint if it can be had, and warns if not.
    """

    log = RouterLogger()
    _port: Optional[IListeningPort] = None

    def __init__(self, description: str, reactor: IReactorCore, site: QuietSite, what: str) -> None:
        self.description = description
        self._reactor = reactor
        self._site = site
        self._what = what

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            limited = _AtMost(self._site, self._site.connectionLimit)
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
