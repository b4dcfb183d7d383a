"""
The command line of C{twistd docker-router}, and the services it makes.

Nothing else in the package knows about argv.
"""

import os
import socket
import sys
from types import TracebackType
from typing import Any, Callable, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore, IStreamServerEndpoint
from twisted.python import lockfile, usage

from dockerrouter import __version__
from dockerrouter.base._compat import (
    dropOwnLock,
    forgetExitSignal,
    guardStop,
    inheritedDescriptors,
    keepAcceptLogger,
    listeningPort,
    lockHolder,
    raiseListenErrors,
)
from dockerrouter.relay.budget import DEFAULT_PER_USER, DEFAULT_TOTAL, MiB, Budget
from dockerrouter.base.endpoints import bindInode
from dockerrouter.base.endpoints import unixPath as _unixPath
from dockerrouter.defaults import DEFAULT_CONFIG, DEFAULT_CONTROL, DEFAULT_LISTEN, DEFAULT_SUBGID_FILE, DEFAULT_SUBUID_FILE
from dockerrouter.relay.settings import Settings
from dockerrouter.routing.rules import checkTemplate
from dockerrouter.service.config import FileOptions, Reloader, settingsFrom
from dockerrouter.service.control import controlSite
from dockerrouter.service.handover import LISTEN, FdStore, HandOverService, listenName
from dockerrouter.relay.limits import AcceptBackoff, raiseDescriptorLimit
from dockerrouter.base.logging import RouterLogger
from dockerrouter.service.logfiles import FileLogsService
from dockerrouter.service.metrics import RouterMetrics
from dockerrouter.routing.namespaces import provable
from dockerrouter.service.notify import Notifier, NotifyService
from dockerrouter.relay.factory import RouterFactory
from dockerrouter.relay.sockets import answers
from dockerrouter.service.reload import ReloadService
from dockerrouter.service.provision import KINDS, TIMEOUT, Policy, Provisioner
from dockerrouter.service.starter import Starter, processRunner
from dockerrouter.service.web import OptionalListener

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


def _startMode(value: str) -> str:
    if value != "systemd":
        raise ValueError(f"{value!r}: the only way to start a daemon is systemd")
    return value


def _provisionKinds(value: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in value.split(",") if kind.strip())
    wrong = [kind for kind in kinds if kind not in KINDS]
    if not kinds or wrong:
        raise ValueError(f"{value!r}: name what to set up, in order, from {', '.join(KINDS)}")
    return kinds


def withBacklog(description: str) -> str:
    """A Unix listen endpoint that names no backlog gets L{DEFAULT_BACKLOG}."""
    if description.startswith("unix:") and ":backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class Options(FileOptions):
    synopsis = "[options]"
    longdesc = (
        "Listen on the Docker socket path and relay each client to its own "
        "user's rootless Docker daemon, after checking that the daemon runs "
        "as that user."
    )

    optParameters = [
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
            DEFAULT_SUBUID_FILE,
            "Subordinate uid ranges: a uid in a user's range is routed to that "
            "user's daemon when the client runs in a user namespace the user "
            "owns (their rootless container).",
        ],
        [
            "subgid-file",
            None,
            DEFAULT_SUBGID_FILE,
            "Subordinate gid ranges: a rule's group inside one is warned about "
            "(a user namespace can give it), at start and on reload.",
        ],
        [
            "advice",
            None,
            None,
            "Site text or a URL for users whose daemon can't be used: replaces "
            "the router's own advice, or extends it where it says {advice}.",
        ],
        [
            "config",
            None,
            None,
            "Configuration file (TOML, one key per long option; the command "
            "line wins), re-read on SIGHUP. [default: " + DEFAULT_CONFIG + " if it exists]",
        ],
        [
            "control",
            None,
            DEFAULT_CONTROL,
            "Twisted server endpoint string of the read-only control endpoint "
            "that `docker-router status` reads (root only); empty for none.",
        ],
        [
            "metrics-users",
            None,
            100,
            "With --metrics-per-user: how many users, the most recently active, "
            "have series of their own.",
            _count,
        ],
        [
            "start",
            None,
            None,
            "How to start a user's daemon when none answers: `systemd` (their "
            "manager starts their enabled docker.service or podman.socket; the "
            "client waits). [default: never]",
            _startMode,
        ],
        [
            "start-timeout",
            None,
            30.0,
            "With --start: seconds a client waits for its daemon to answer.",
            _positive,
        ],
        [
            "provision",
            None,
            None,
            "Set up a daemon, as the user, for a user who has none enabled: "
            "what to set up, in order of preference (docker,podman); implies "
            "--start systemd. [default: never]",
            _provisionKinds,
        ],
        [
            "provision-group",
            None,
            None,
            "With --provision: only for members of this group.",
        ],
        [
            "provision-timeout",
            None,
            TIMEOUT,
            "With --provision: seconds a client waits while its daemon is set up.",
            _positive,
        ],
    ]
    optFlags = [
        ["no-subuid", None, "Route subordinate uids by their own number."],
        ["metrics-per-user", None, "Add per-user series to the metrics."],
        [
            "provision-subids",
            None,
            "With --provision: give a user without subordinate ids a free range "
            "of 65536 (usermod --add-subuids --add-subgids).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["metrics"] = []
        self["user-socket"] = []
        # [[rule]] tables: only the configuration file has them.
        self["rule"] = ()

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"docker-router {__version__}")
        sys.exit(0)

    def opt_listen(self, description: str) -> None:
        """
        Twisted server endpoint string to listen on (repeatable).
        [default: unix:/var/run/docker.sock:mode=666:lockfile=1]
        """
        self["listen"].append(description)

    def opt_user_socket(self, template: str) -> None:
        """
        A socket where each user's daemon may listen, tried in the order
        given (repeatable); {uid}, {user} and {home} are filled in.
        [default: /run/user/{uid}/docker.sock, /run/user/{uid}/podman/podman.sock,
        {home}/.docker/run/docker.sock]
        """
        self["user-socket"].append(template)

    def opt_metrics(self, description: str) -> None:
        """
        Twisted server endpoint string to serve Prometheus metrics on, at
        /metrics (repeatable). [default: none]
        """
        self["metrics"].append(description)

    def postOptions(self) -> None:
        self.readConfigFile()
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for template in self["user-socket"]:
            try:
                checkTemplate(template)
            except ValueError as e:
                raise usage.UsageError(str(e))


class CannotListen(Exception):
    """
    A listening endpoint can't be had.  twistd stops with a non-zero status:
    in the foreground this prints one line (see L{_oneLineFor}); daemonized,
    twistd's parent prints it (the exception must be an C{Exception} to reach
    twistd's status pipe, or the parent would wait forever).  What can be
    found out before twistd forks (a bad endpoint, another router holding
    the path) is raised from L{makeService}, and prints one line either way.
    """

    # twistd (daemonized) shows 100 bytes of "module.Class: message": the
    # package name leaves the reason the room it had before tap.py moved.
    __module__ = "dockerrouter"


def _refuse(description: str, reason: str) -> CannotListen:
    """A L{CannotListen} for C{description}, printed as one line."""
    sys.excepthook = _oneLineFor(sys.excepthook)
    return CannotListen(f"docker-router: cannot listen on {description}: {reason}")


def _oneLineFor(previous: Callable[..., Any]) -> Callable[..., Any]:
    """A C{sys.excepthook} that prints a L{CannotListen} as its message alone."""
    if getattr(previous, "printsCannotListen", False):
        return previous  # installed before in this process

    def excepthook(
        kind: type[BaseException], value: BaseException, traceback: Optional[TracebackType]
    ) -> None:
        if issubclass(kind, CannotListen):
            sys.stderr.write(f"{value}\n")
        else:
            previous(kind, value, traceback)

    excepthook.printsCannotListen = True  # type: ignore[attr-defined]  # a mark on the function
    return excepthook


def _anotherRouter(pid: Optional[int]) -> str:
    held = f" (pid {pid})" if pid else ""
    return f"another docker-router{held} is already listening there"


def _endpointFor(reactor: IReactorCore, description: str) -> IStreamServerEndpoint:
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
    L{guardStop}).  With systemd's file descriptor store (C{store}), a
    socket it binds goes to the store at once and outlives the process;
    the next process adopts it (C{kept}: its descriptor, given here).
    """

    log = RouterLogger()

    def __init__(
        self,
        description: str,
        endpoint: Any,
        reactor: Any,
        factory: RouterFactory,
        store: Optional[FdStore] = None,
        kept: Optional[int] = None,
    ) -> None:
        super().__init__(endpoint, factory)
        raiseListenErrors(self)
        self.description = description
        self._reactor = reactor
        self._store = store
        self._kept = kept

    def privilegedStartService(self) -> None:
        path = _unixPath(self.description)
        if self._kept is not None and path is not None:
            self._lockKept(path)
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
        if path is None or self._kept is not None:
            # Adopted (from systemd's socket unit or its store), with the
            # backlog it was made with; Twisted listen()s again with its
            # own default of 50.
            port.socket.listen(DEFAULT_BACKLOG)
        if path is None:
            guardStop(port, None, self._leftAlone)
        elif self._store is not None and self._store.enabled:
            if self._kept is None:
                self._store.store(listenName(path), port.fileno())
            guardStop(port, None, self._leftAlone, keepLock=True)
        else:
            guardStop(port, bindInode(path), self._leftAlone)
        AcceptBackoff(self._reactor, port)
        keepAcceptLogger(port)

    def _lockKept(self, path: str) -> None:
        """
        Hold the lock of a kept socket's path (left stale by the last
        process), as binding it would have, if the description asks for one.
        """
        if ":lockfile=1" not in self.description:
            return
        if not lockfile.FilesystemLock(path + ".lock").lock():
            raise _refuse(self.description, _anotherRouter(lockHolder(path)))

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

    def __init__(self, factory: RouterFactory) -> None:
        self.factory = factory

    def stopService(self) -> Any:
        super().stopService()
        live = len(self.factory.relays)
        timeout = self.factory.settings.shutdownTimeout
        if live:
            self.log.info(
                "shutting down: letting {live} live connections finish "
                "for up to {timeout}s",
                live=live,
                timeout=timeout,
            )
        return self.factory.drain(timeout).addCallback(self._summarize)

    def _summarize(self, counts: tuple) -> None:
        finished, aborted = counts
        self.log.info(
            "shutdown: {finished} connections finished, {aborted} aborted",
            finished=finished,
            aborted=aborted,
        )
        # The shutdown SIGTERM or SIGINT asked for is done: exit 0, not 143.
        forgetExitSignal(self.factory.reactor)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    store = FdStore()
    inherited = inheritedDescriptors()
    listeners = []
    for description in options["listen"]:
        path = _unixPath(description)
        kept = inherited.pop(listenName(path), None) if path is not None else None
        if kept is not None:
            endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(reactor, kept, socket.AF_UNIX)
        else:
            endpoint = _endpointFor(reactor, description)
        listeners.append((description, endpoint, kept))
    for name in [name for name in inherited if name.startswith(LISTEN)]:
        # A socket the last process listened on that no --listen names now.
        os.close(inherited.pop(name))
        store.remove(name)
    log = RouterLogger()
    before, limit = raiseDescriptorLimit()
    log.info(
        "open file limit: {limit} (raised from {before})" if before != limit else "open file limit: {limit}",
        limit=limit,
        before=before,
    )

    def settingsFor(options: FileOptions) -> Settings:
        return settingsFrom(options, reactor, limit, lambda text: log.warn("{message}", message=text))

    settings = settingsFor(options)
    # Found out now, so that a kernel that can't prove which process holds
    # a connection is said at start (once), not at some client's.
    provable()
    factory = RouterFactory(
        reactor,
        settings,
        budget=Budget(
            reactor,
            perUser=options["max-in-flight-per-user"] * MiB,
            total=options["max-in-flight"] * MiB,
        ),
    )
    # Always there (its counts outlive a reload); used when settings.start.
    factory.starter = Starter(reactor, lambda backend: factory.workers.run(backend.uid, answers, backend))
    if options["provision"]:
        factory.starter.provisioner = provisioner = Provisioner(
            reactor,
            processRunner(reactor),
            Policy(options["provision"], options["provision-group"], options["provision-subids"], options["provision-timeout"]),
        )
        reactor.callWhenRunning(provisioner.loadRecords)

    def reloadSubordinates() -> "str | Deferred[str]":
        subordinates = factory.settings.subordinates
        return subordinates.reload() if subordinates is not None else "no subordinate uid ranges"

    # What SIGHUP re-reads: each returns a few words for its log line.  (New
    # settings from the file read their subordinate uid file afresh.)
    reload = Reloader(options, factory, settingsFor, log)
    reloaders: list[Callable[[], "str | Deferred[str]"]] = [reloadSubordinates, reload]
    notifier = Notifier()
    top = MultiService()
    FileLogsService().setServiceParent(top)
    # Started before the listeners (a resumed relay is counted before any
    # new client), stopped after them (nothing is accepted any more).
    stored = sum(1 for description, _, _ in listeners if _unixPath(description) is not None)
    HandOverService(factory, store, inherited, stored).setServiceParent(top)
    if not store.enabled:
        _DrainService(factory).setServiceParent(top)
    for description, endpoint, kept in listeners:
        _ListeningService(description, endpoint, reactor, factory, store, kept).setServiceParent(top)
    if options["metrics"]:
        site = RouterMetrics(factory, reload.counts).site()
        for description in options["metrics"]:
            OptionalListener(description, reactor, site, "metrics").setServiceParent(top)
    if options["control"]:
        control = controlSite(factory)
        OptionalListener(options["control"], reactor, control, "the control endpoint").setServiceParent(top)
    # After the listeners: stopped first, so STOPPING=1 precedes the drain.
    NotifyService(reactor, factory, notifier).setServiceParent(top)
    ReloadService(reactor, reloaders, notifier).setServiceParent(top)
    return top
