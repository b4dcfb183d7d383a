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
from twisted.web.server import Site

from dockerrouter.logging import RouterLogger


class QuietSite(Site):
    """A site that writes no log line per request (a scrape every 15 s)."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


class OptionalListener(Service):
    """
    Serves a site on an endpoint if it can be had, and warns if not.
    """

    log = RouterLogger()
    _port: Optional[IListeningPort] = None

    def __init__(self, description: str, reactor: IReactorCore, site: Site, what: str) -> None:
        self.description = description
        self._reactor = reactor
        self._site = site
        self._what = what

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            waiting = serverFromString(self._reactor, self.description).listen(self._site)
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
