"""
The command line of C{twistd docker-router}, and the services it makes.

Nothing else in the package knows about argv.
"""

import os
import sys
from typing import Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from dockerrouter.backends import (
    DEFAULT_TEMPLATE,
    BackendResolver,
    RecentNames,
    SubordinateIds,
)
from dockerrouter.budget import DEFAULT_PER_USER, DEFAULT_TOTAL, MiB, Budget
from dockerrouter.limits import AcceptBackoff, connectionsFor, raiseDescriptorLimit
from dockerrouter.logging import RouterLogger
from dockerrouter.relay import RouterFactory

DEFAULT_LISTEN = "unix:/var/run/docker.sock:mode=666:lockfile=1"

# Twisted's default Unix listen backlog is 50: a burst of docker CLIs (each a
# non-blocking connect) would see EAGAIN.  The kernel caps it at somaxconn.
DEFAULT_BACKLOG = 4096


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{value} is not a positive number")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not a positive whole number")
    return number


def withBacklog(description: str) -> str:
    """A Unix listen endpoint that names no backlog gets L{DEFAULT_BACKLOG}."""
    if description.startswith("unix:") and ":backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Listen on the Docker socket path and relay each client to its own "
        "user's rootless Docker daemon, after checking that the daemon runs "
        "as that user."
    )

    optParameters = [
        [
            "user-socket",
            None,
            DEFAULT_TEMPLATE,
            "Path of each user's daemon socket; {uid} and {user} are filled in.",
        ],
        [
            "connect-timeout",
            None,
            5.0,
            "Seconds to wait for a user's daemon to accept.",
            _positive,
        ],
        [
            "shutdown-timeout",
            None,
            10.0,
            "Seconds live relays may finish after SIGTERM before they are cut.",
            _positive,
        ],
        [
            "max-connections-per-user",
            None,
            1024,
            "Connections one user may hold at once; more get HTTP 429.",
            _count,
        ],
        [
            "max-connections",
            None,
            None,
            "Connections in total; more get HTTP 429. "
            "[default: what the descriptor limit allows]",
            _count,
        ],
        [
            "max-in-flight-per-user",
            None,
            DEFAULT_PER_USER // MiB,
            "MiB of kernel memory (big pipes, grown socket buffers) one user's "
            "bulk transfers may hold; beyond it they go at the pace of small buffers.",
            _count,
        ],
        [
            "max-in-flight",
            None,
            DEFAULT_TOTAL // MiB,
            "MiB of kernel memory all bulk transfers together may hold.",
            _count,
        ],
        [
            "subuid-file",
            None,
            "/etc/subuid",
            "Subordinate uid ranges: a uid in a user's range (a process in "
            "their rootless container) is routed to that user's daemon.",
        ],
    ]
    optFlags = [
        ["no-subuid", None, "Route subordinate uids by their own number."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Twisted server endpoint string to listen on (repeatable).
        [default: unix:/var/run/docker.sock:mode=666:lockfile=1]
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            _checkListen(description)
        _checkTemplate(self["user-socket"])


def _checkListen(description: str) -> None:
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:
        raise usage.UsageError(f"bad --listen endpoint {description!r}: {e}")
    if description.startswith("unix:"):
        path = description[len("unix:") :].split(":", 1)[0]
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise usage.UsageError(
                f"cannot listen on {path}: directory {directory} does not exist"
            )


def _checkTemplate(template: str) -> None:
    try:
        path = template.format(uid=0, user="root")
    except (KeyError, IndexError, ValueError) as e:
        raise usage.UsageError(
            f"bad --user-socket {template!r}: only {{uid}} and {{user}} can be "
            f"filled in ({e!r})"
        )
    if not os.path.isabs(path):
        raise usage.UsageError(f"--user-socket must be an absolute path: {template!r}")


class CannotListen(Exception):
    """
    A listening endpoint can't be had.  twistd stops with a non-zero status:
    in the foreground this prints one line (see L{_oneLineFor}); daemonized,
    twistd's parent prints it (the exception must be an C{Exception} to reach
    twistd's status pipe, or the parent would wait forever).
    """


def _oneLineFor(previous):
    """A C{sys.excepthook} that prints a L{CannotListen} as its message alone."""
    if getattr(previous, "printsCannotListen", False):
        return previous  # makeService ran before in this process

    def excepthook(kind, value, traceback):
        if issubclass(kind, CannotListen):
            sys.stderr.write(f"{value}\n")
        else:
            previous(kind, value, traceback)

    excepthook.printsCannotListen = True  # type: ignore[attr-defined]
    return excepthook


class _ListeningService(StreamServerEndpointService):
    """
    Listens on one endpoint, and guards its accepting against running out of
    descriptors.
    """

    _raiseSynchronously = True

    def __init__(self, description: str, reactor, factory: RouterFactory) -> None:
        super().__init__(serverFromString(reactor, withBacklog(description)), factory)
        self.description = description
        self._reactor = reactor

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
            AcceptBackoff(self._reactor, self._waitingForPort.result)
        except CannotListenError as e:
            reason = e.socketError
            if reason == "Cannot acquire lock":
                reason = "another docker-router is already listening there"
            raise CannotListen(f"docker-router: cannot listen on {self.description}: {reason}")
        except Exception as e:
            raise CannotListen(f"docker-router: cannot listen on {self.description}: {e}")

    def stopService(self):
        if self.description.startswith("systemd:") and self._waitingForPort.called:
            # Twisted unlinks a Unix port's path when it stops listening, even
            # a socket it adopted from systemd, which still owns it and will
            # hand it to the next start: make the path look abstract to it.
            port = self._waitingForPort.result
            if getattr(port, "_bindPath", None):
                port._bindPath = b"\0"
        return super().stopService()


class _DrainService(Service):
    """
    On shutdown, lets live relays finish for a while, then cuts the rest.
    (The listening services stop accepting at the same time.)
    """

    log = RouterLogger()

    def __init__(self, factory: RouterFactory, timeout: float) -> None:
        self.factory = factory
        self.timeout = timeout

    def stopService(self):
        super().stopService()
        live = len(self.factory.relays)
        if live:
            self.log.info(
                "shutting down: letting {live} live connections finish "
                "for up to {timeout}s",
                live=live,
                timeout=self.timeout,
            )
        return self.factory.drain(self.timeout).addCallback(self._summarize)

    def _summarize(self, counts: tuple) -> None:
        finished, aborted = counts
        self.log.info(
            "shutdown: {finished} connections finished, {aborted} aborted",
            finished=finished,
            aborted=aborted,
        )


def makeService(options: Options, reactor: Optional[object] = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    log = RouterLogger()
    sys.excepthook = _oneLineFor(sys.excepthook)
    before, limit = raiseDescriptorLimit()
    log.info(
        "open file limit: {limit} (raised from {before})" if before != limit else "open file limit: {limit}",
        limit=limit,
        before=before,
    )
    subordinates = None
    if not options["no-subuid"]:
        subordinates = SubordinateIds(
            options["subuid-file"],
            warn=lambda text: log.warn("{message}", message=text),
            clock=reactor.seconds,
        )
    factory = RouterFactory(
        reactor,
        BackendResolver(
            options["user-socket"],
            lookupName=RecentNames(reactor.seconds),
            subordinates=subordinates,
        ),
        connectTimeout=options["connect-timeout"],
        maxConnections=options["max-connections"] or connectionsFor(limit),
        maxConnectionsPerUser=options["max-connections-per-user"],
        budget=Budget(
            reactor,
            perUser=options["max-in-flight-per-user"] * MiB,
            total=options["max-in-flight"] * MiB,
        ),
    )
    top = MultiService()
    _DrainService(factory, options["shutdown-timeout"]).setServiceParent(top)
    for description in options["listen"]:
        _ListeningService(description, reactor, factory).setServiceParent(top)
    return top
