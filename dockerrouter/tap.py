"""
The command line of C{twistd docker-router}, and the services it makes.

Nothing else in the package knows about argv.
"""

import os
import socket
import sys
from typing import Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.python import usage

from dockerrouter._compat import (
    bindInode,
    dropOwnLock,
    forgetExitSignal,
    guardStop,
    listeningPort,
    lockHolder,
    raiseListenErrors,
)
from dockerrouter.backends import (
    DEFAULT_TEMPLATE,
    BackendResolver,
    RecentNames,
    SubordinateIds,
)
from dockerrouter.limits import AcceptBackoff, connectionsFor, raiseDescriptorLimit
from dockerrouter.logging import RouterLogger
from dockerrouter.notify import Notifier, NotifyService
from dockerrouter.relay import RouterFactory
from dockerrouter.reload import ReloadService

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
        _checkTemplate(self["user-socket"])


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
    twistd's status pipe, or the parent would wait forever).  What can be
    found out before twistd forks (a bad endpoint, another router holding
    the path) is raised from L{makeService}, and prints one line either way.
    """


def _refuse(description: str, reason: str) -> CannotListen:
    """A L{CannotListen} for C{description}, printed as one line."""
    sys.excepthook = _oneLineFor(sys.excepthook)
    return CannotListen(f"docker-router: cannot listen on {description}: {reason}")


def _oneLineFor(previous):
    """A C{sys.excepthook} that prints a L{CannotListen} as its message alone."""
    if getattr(previous, "printsCannotListen", False):
        return previous  # installed before in this process

    def excepthook(kind, value, traceback):
        if issubclass(kind, CannotListen):
            sys.stderr.write(f"{value}\n")
        else:
            previous(kind, value, traceback)

    excepthook.printsCannotListen = True  # type: ignore[attr-defined]
    return excepthook


def _unixPath(description: str) -> Optional[str]:
    if description.startswith("unix:"):
        return description[len("unix:") :].split(":", 1)[0]
    return None


def _anotherRouter(pid: Optional[int]) -> str:
    held = f" (pid {pid})" if pid else ""
    return f"another docker-router{held} is already listening there"


def _endpointFor(reactor, description: str):
    """
    The endpoint for a C{--listen} description, or a L{CannotListen}: only
    Unix stream sockets carry the peer credentials the router routes by.
    """
    try:
        endpoint = serverFromString(reactor, withBacklog(description))
    except Exception as e:
        raise _refuse(description, f"bad --listen endpoint: {e}")
    onlyUnix = (
        "only Unix stream sockets carry the peer credentials docker-router "
        "routes by (unix:PATH, or systemd:domain=UNIX:index=N)"
    )
    if isinstance(endpoint, AdoptedStreamServerEndpoint):
        if endpoint.addressFamily != socket.AF_UNIX:
            raise _refuse(description, onlyUnix)
        _checkAdopted(description, endpoint.fileno)
    elif not isinstance(endpoint, UNIXServerEndpoint):
        raise _refuse(description, onlyUnix)
    path = _unixPath(description)
    if path is not None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise _refuse(description, f"directory {directory} does not exist")
        holder = lockHolder(path)
        if holder is not None:
            raise _refuse(description, _anotherRouter(holder))
    return endpoint


def _checkAdopted(description: str, fileno: int) -> None:
    """A descriptor systemd hands over must be a Unix stream socket."""
    try:
        sock = socket.socket(fileno=os.dup(fileno))
    except OSError as e:
        raise _refuse(description, f"descriptor {fileno} is not a socket ({e.strerror})")
    with sock:
        if (sock.family, sock.type) != (socket.AF_UNIX, socket.SOCK_STREAM):
            raise _refuse(
                description,
                f"systemd handed over a {sock.family.name}/{sock.type.name} "
                "socket, not a Unix stream socket (ListenStream=/a/path)",
            )


class _ListeningService(StreamServerEndpointService):
    """
    Listens on one endpoint, guards its accepting against running out of
    descriptors, and on stop leaves alone what isn't its own (see
    L{guardStop}).
    """

    log = RouterLogger()

    def __init__(self, description: str, endpoint, reactor, factory: RouterFactory) -> None:
        super().__init__(endpoint, factory)
        raiseListenErrors(self)
        self.description = description
        self._reactor = reactor

    def privilegedStartService(self) -> None:
        path = _unixPath(self.description)
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            if path is not None:
                dropOwnLock(path)
            reason = e.socketError
            if reason == "Cannot acquire lock":
                reason = _anotherRouter(lockHolder(path) if path else None)
            raise _refuse(self.description, str(reason))
        except Exception as e:
            raise _refuse(self.description, str(e))
        port = listeningPort(self)
        if path is None:
            # Adopted from systemd, which set its backlog; Twisted listen()s
            # again with its own default of 50.
            port.socket.listen(DEFAULT_BACKLOG)
            guardStop(port, None, self._leftAlone)
        else:
            guardStop(port, bindInode(path), self._leftAlone)
        AcceptBackoff(self._reactor, port)

    def _leftAlone(self, path: str) -> None:
        self.log.warn(
            "left {path} in place: it is no longer the socket this router bound",
            path=path,
        )


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
        # The shutdown SIGTERM or SIGINT asked for is done: exit 0, not 143.
        forgetExitSignal(self.factory.reactor)


def makeService(options: Options, reactor: Optional[object] = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    endpoints = [(d, _endpointFor(reactor, d)) for d in options["listen"]]
    log = RouterLogger()
    before, limit = raiseDescriptorLimit()
    log.info(
        "open file limit: {limit} (raised from {before})" if before != limit else "open file limit: {limit}",
        limit=limit,
        before=before,
    )
    # What SIGHUP re-reads: each returns a few words for its log line.
    reloaders = []
    subordinates = None
    if not options["no-subuid"]:
        subordinates = SubordinateIds(
            options["subuid-file"],
            warn=lambda text: log.warn("{message}", message=text),
            clock=reactor.seconds,
        )
        reloaders.append(subordinates.reload)
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
    )
    notifier = Notifier()
    top = MultiService()
    _DrainService(factory, options["shutdown-timeout"]).setServiceParent(top)
    for description, endpoint in endpoints:
        _ListeningService(description, endpoint, reactor, factory).setServiceParent(top)
    # After the listeners: stopped first, so STOPPING=1 precedes the drain.
    NotifyService(reactor, factory, notifier).setServiceParent(top)
    ReloadService(reactor, reloaders, notifier).setServiceParent(top)
    return top
