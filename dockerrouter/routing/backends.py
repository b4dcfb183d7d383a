"""
From a client's identity to the daemon it may reach, and every reason that
daemon can't be used.

This module knows users, paths and the rule of the security boundary; it knows
nothing of transports or protocols.
"""

import bisect
import errno
import os
import pwd
import shutil
import socket
import stat
from typing import Callable, ClassVar, NamedTuple, Optional, Sequence, Union

from attrs import Factory, field, frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from dockerrouter.routing.credentials import Credentials, peerGroups
from dockerrouter.routing.namespaces import ROUTERS, namespaceOf
from dockerrouter.defaults import DEFAULT_CHAIN
from dockerrouter.routing.rules import Account, Lookups, NeedLookup, Rule
from dockerrouter.routing.visibility import Found, Missing

SETUP_TOOL = "dockerd-rootless-setuptool.sh"
# Where Debian's docker.io puts it (not on PATH).
SETUP_TOOL_DIRECTORIES = ("/usr/share/docker.io/contrib",)


@frozen
class Backend:
    """
    One place a client's connection may go, and who must be listening there.

    @ivar uid: the uid the connection is for (the client's, or its
        subordinate uid's owner): counted against caps, named in messages.
    @ivar user: the name of that uid, or the uid as text when the user
        database has none (the connection still routes by number).
    @ivar owner: the uid the daemon at C{path} must run as: C{uid}, unless
        a rule names another.
    @ivar template: the configured path C{path} was made from (a bounded
        label for metrics).
    """

    path: str
    uid: int
    user: str
    owner: int = field(default=Factory(lambda self: self.uid, takes_self=True))
    template: str = ""


@frozen
class Route:
    """Where a client may go: the candidates, tried in order."""

    candidates: tuple[Backend, ...]


class Judged(NamedTuple):
    """
    What the kernel says of a client, judged once, when it is accepted
    (see L{BackendResolver.judge}): routing later uses these facts, never
    a pid looked at again.

    @ivar uid: the uid it is routed as: its own, or, for a process in a
        user's rootless container, that user's.
    @ivar groups: the groups it may be matched by (primary gid included):
        only where the kernel's word is the client's own.
    @ivar allGroups: whether C{groups} are all of them; if not, a rule by
        group fails closed (see L{Rule.matches}).
    """

    uid: int
    groups: frozenset[int]
    allGroups: bool


_NO_GROUPS: frozenset[int] = frozenset()


class BackendResolver:
    """
    Makes the chain of candidate sockets for a client: the first rule that
    matches it, or the default chain, filled in for its own uid or, for a
    process in a user's rootless container, the owning user's.

    A uid in a user's subordinate range is routed to that user only when
    the client runs in a user namespace that user owns (the outermost one
    below the router's): a real account may have a uid inside someone's
    range, and a namespace of someone else's may map it.  Such a client is
    matched by the owner's uid, and by no group (its groups are
    subordinate ids).  Any client's groups count only when it runs in the
    router's own user namespace: in one of its own, a user can map a gid
    of their subordinate range to a group's number, or drop a group.

    @ivar advice: what to tell this host's users (see L{Advice}).
    """

    def __init__(
        self,
        templates: Union[str, Sequence[str]] = DEFAULT_CHAIN,
        lookupName: Optional[Callable[[int], str]] = None,
        subordinates: Optional["SubordinateIds"] = None,
        namespaceOf: Callable[
            [socket.socket, Credentials, Optional[frozenset[int]]], Optional[int]
        ] = namespaceOf,
        advice: Optional["Advice"] = None,
        rules: Sequence[Rule] = (),
        lookups: Optional[Lookups] = None,
    ) -> None:
        self.templates = (templates,) if isinstance(templates, str) else tuple(templates)
        if lookups is None:
            lookups = Lookups()
            if lookupName is not None:
                lookups = Lookups(account=lambda uid: Account(lookupName(uid)))
        self.lookups = lookups
        self._subordinates = subordinates
        self._namespaceOf = namespaceOf
        self.advice = advice or Advice()
        self.rules = tuple(rules)
        self._needGroups = any(rule.groups for rule in self.rules)
        # (uid, owner, templates) -> (the account it was made with, route):
        # a route is made once per user, and again when their account is
        # looked up anew (see L{Lookups}).
        self._routes: dict[tuple, tuple[Account, Route]] = {}

    def judge(self, client: Credentials, sock: socket.socket) -> Judged:
        """
        What routing may trust of C{client}, connected on C{sock}: read
        once, at accept.  Only a client whose uid is in a subordinate
        range, or every client when rules match groups, has its namespace
        read; for anyone else this makes no system call.
        """
        uid = client.uid
        owner = self._subordinates.owner(uid) if self._subordinates is not None else uid
        if owner == uid and not self._needGroups:
            return Judged(uid, _NO_GROUPS, False)
        claimed = None
        supplementary = None
        if self._needGroups:
            # A client in more groups than the kernel tells (256) is judged
            # by its primary group, and rules by group fail closed.
            supplementary = peerGroups(sock)
            claimed = frozenset({client.gid}) | (supplementary or _NO_GROUPS)
        where = self._namespaceOf(sock, client, claimed)
        if owner != uid and where == owner:
            # A process of the owner's container: no groups on the host.
            return Judged(owner, _NO_GROUPS, False)
        if where == ROUTERS and claimed is not None:
            return Judged(uid, claimed, supplementary is not None)
        return Judged(uid, _NO_GROUPS, False)

    def resolve(self, client: Credentials, judged: Optional[Judged] = None) -> Route:
        """
        The candidates of C{client}, as C{judged} at accept (without it,
        the client routes as its own uid, matched by no group).

        @raise NeedLookup: while an answer of the user database is looked
            up (call again once it fires).
        @raise BackendUnusable: when a rule denies the client.
        """
        if judged is None:
            judged = Judged(client.uid, _NO_GROUPS, False)
        uid, gids, allGroups = judged
        account = self.lookups.account(uid)
        templates, owner = self.templates, uid
        for rule in self.rules:
            if rule.matches(uid, gids, self.lookups, allGroups):
                if rule.deny is not None:
                    raise Denied(Backend("-", uid, account.name), rule.deny)
                templates = rule.sockets
                if rule.owner is not None:
                    named = rule.owner if isinstance(rule.owner, int) else self.lookups.uid(rule.owner)
                    if named is None:
                        raise NoRoute(
                            Backend("-", uid, account.name),
                            f"the rule names owner {rule.owner!r}, who is not in the user database",
                        )
                    owner = named
                break
        key = (uid, owner, templates)
        made = self._routes.get(key)
        if made is not None and made[0] is account:
            return made[1]
        candidates = tuple(
            Backend(template.format(uid=uid, user=account.name, home=account.home), uid, account.name, owner, template)
            for template in templates
            if account.home is not None or "{home}" not in template
        )
        if not candidates:
            raise NoRoute(
                Backend("-", uid, account.name, owner),
                "every socket path needs a home directory, and the user database has none",
            )
        route = Route(candidates)
        if len(self._routes) >= 100_000:
            self._routes.clear()
        self._routes[key] = (account, route)
        return route


def loginDefsUidMin(path: str = "/etc/login.defs", default: int = 1000) -> int:
    """
    C{UID_MIN} of C{login.defs(5)}: the lowest uid of a regular account.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "UID_MIN" and fields[1].isdigit():
                    return int(fields[1])
    except OSError:
        pass
    return default


class SubordinateIds:
    """
    The owners of the subordinate uid ranges in C{/etc/subuid}, re-read when
    the file changes.

    Inside a user's rootless container, root is the user and every other uid
    is one of their subordinate ids; those processes belong to that user's
    daemon.  Lines that are broken, name an unknown user, belong to root or
    a system account (below C{uidMin}: Proxmox and LXD give root ranges,
    and no client may be sent to root's socket this way) or overlap another
    range (an id claimed twice has no owner we could trust) are ignored,
    each with a warning from C{warn} when the file is read.  uid 0 never
    maps to anyone.

    The file is looked at (one C{stat}) at most once a second, not on every
    connection.
    """

    checkInterval = 1.0

    def __init__(
        self,
        path: str,
        warn: Callable[[str], None],
        clock: Callable[[], float],
        uidMin: int = 1000,
        inThread: Optional[Callable[..., Deferred]] = None,
    ) -> None:
        """
        @param inThread: runs a call off the reactor thread (the router's):
            the names in the file are looked up in the user database, which
            may be LDAP and may hang.  The ranges read last stand while the
            file is read again; until the first read is done, L{owner}
            raises L{NeedLookup}.  Without it (tools, tests) the file is
            read at once.
        """
        self.path = path
        self.uidMin = uidMin
        self._warn = warn
        self._clock = clock
        self._inThread = inThread
        self._reading: Optional[Deferred] = None
        # Whether the file has been read once; who waits for that.
        self._read = False
        self._waiting: list[Deferred] = []
        self._nextCheck = float("-inf")
        self._stamp: Optional[tuple] = None
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, int]] = []

    def owner(self, uid: int) -> int:
        """
        The uid that owns C{uid}: its range's owner, or C{uid} itself.

        @raise NeedLookup: while the file is read for the first time.
        """
        if uid == 0:
            return uid
        self._refresh()
        if not self._read and self._reading is not None:
            raise NeedLookup(self._whenRead())
        i = bisect.bisect_right(self._starts, uid) - 1
        if i >= 0:
            start, count, owner = self._ranges[i]
            if uid < start + count:
                return owner
        return uid

    def reload(self) -> Union[str, Deferred]:
        """
        Read the file now, changed or not (SIGHUP); say what was read (a
        Deferred of it, when read off the reactor thread).
        """
        if self._reading is not None:
            # Read again once the read in flight is done.
            return self._whenRead().addCallback(lambda _: self.reload())
        self._nextCheck = float("-inf")
        self._stamp = None
        self._refresh()
        if self._reading is None:
            return self._said()
        return self._whenRead().addCallback(lambda _: self._said())

    def _said(self) -> str:
        return f"{len(self._ranges)} subordinate uid ranges from {self.path}"

    def _whenRead(self) -> Deferred:
        """Fires when the read in flight is done."""
        waiter: Deferred = Deferred()
        self._waiting.append(waiter)
        return waiter

    def _refresh(self) -> None:
        now = self._clock()
        if now < self._nextCheck or self._reading is not None:
            return
        self._nextCheck = now + self.checkInterval
        if self._inThread is None:
            self._apply(self._readFile(self._stamp))
            return
        self._reading = self._inThread(self._readFile, self._stamp)
        self._reading.addCallbacks(self._apply, self._failed)

    def _readFile(
        self, stamp: Optional[tuple]
    ) -> Optional[tuple[Optional[tuple], list[tuple[int, int, int]], list[str]]]:
        """
        The file's stamp, ranges and warnings, or C{None} when it is
        unchanged since C{stamp}.  (It may ask LDAP: called off the reactor.)
        """
        try:
            st = os.stat(self.path)
            now: Optional[tuple] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            now = None
        if now == stamp and self._read:
            return None
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        warnings: list[str] = []
        return now, self._parse(text, warnings.append), warnings

    def _apply(self, read: Optional[tuple[Optional[tuple], list[tuple[int, int, int]], list[str]]]) -> None:
        if read is not None:
            self._stamp, self._ranges, warnings = read
            self._starts = [start for start, _, _ in self._ranges]
            for warning in warnings:
                self._warn(warning)
        self._readDone()

    def _failed(self, failure: Failure) -> None:
        """A read that failed (the user database): the last ranges stand."""
        self._warn(f"{self.path}: not read ({failure.getErrorMessage()}); the last ranges read stand")
        self._readDone()

    def _readDone(self) -> None:
        self._reading = None
        self._read = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def _parse(self, text: str, warn: Callable[[str], None]) -> list[tuple[int, int, int]]:
        ranges: list[tuple[int, int, int, int]] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                name, first, size = line.strip().split(":")
                start, count = int(first), int(size)
                if start <= 0 or count <= 0:
                    raise ValueError("not a positive range")
                owner = int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
            except (ValueError, KeyError) as e:
                warn(f"{self.path}:{number}: ignored ({e}): {line!r}")
                continue
            ranges.append((start, count, owner, number))
        ignored = {}
        for number in _overlapping(ranges):
            ignored[number] = "its range overlaps another"
        for _, _, owner, number in ranges:
            if owner < self.uidMin and number not in ignored:
                ignored[number] = f"owned by uid {owner}, below UID_MIN {self.uidMin}"
        for number, why in sorted(ignored.items()):
            warn(f"{self.path}:{number}: ignored ({why})")
        return sorted((s, c, o) for s, c, o, n in ranges if n not in ignored)


def _overlapping(ranges: list[tuple[int, int, int, int]]) -> set[int]:
    """
    The line numbers of the (start, count, owner, line) ranges that overlap
    any other: sorted by start, ranges that overlap one another chain into
    runs, and every range of a run of two or more overlaps some other one
    (nested or chained, not just its neighbour).
    """
    overlapping: set[int] = set()
    run: list[int] = []
    end = 0
    for start, count, _, number in sorted(ranges):
        if run and start < end:
            run.append(number)
        else:
            if len(run) > 1:
                overlapping.update(run)
            run = [number]
        end = max(end, start + count) if len(run) > 1 else start + count
    if len(run) > 1:
        overlapping.update(run)
    return overlapping


def locateSetupTool(
    which: Callable[[str], Optional[str]] = shutil.which,
    directories: tuple[str, ...] = SETUP_TOOL_DIRECTORIES,
) -> Optional[str]:
    """Where the setup tool is: on PATH, or where the distribution put it."""
    found = which(SETUP_TOOL)
    if found is not None:
        return found
    for directory in directories:
        candidate = os.path.join(directory, SETUP_TOOL)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def findSetupTool(
    which: Callable[[str], Optional[str]] = shutil.which,
    directories: tuple[str, ...] = SETUP_TOOL_DIRECTORIES,
) -> str:
    """
    The command that sets up a rootless daemon on this host: its bare name
    when it is on PATH (or nowhere to be found), else the name with its
    directory put on PATH: the tool runs C{dockerd-rootless.sh}, which the
    distribution keeps beside it, by name.  Looked for once, at start.
    """
    if which(SETUP_TOOL) is None:
        found = locateSetupTool(lambda name: None, directories)
        if found is not None:
            return f"PATH={os.path.dirname(found)}:$PATH {SETUP_TOOL}"
    return SETUP_TOOL


@frozen
class Advice:
    """
    What the router tells this host's users to do about a problem.

    @ivar setupTool: the command that sets up a rootless daemon here.
    @ivar site: an administrator's text (a sentence, a URL) that replaces
        the router's own advice, or extends it where it says C{{advice}}.
    """

    setupTool: str = SETUP_TOOL
    site: Optional[str] = None

    def render(self, reason: "BackendUnusable") -> str:
        """The whole message of C{reason}: what is wrong, then what to do."""
        backend = reason.backend
        fields = dict(
            path=backend.path,
            user=backend.user,
            uid=backend.uid,
            # Whose daemon the path must lead to.
            whose=f"user {backend.user} (uid {backend.uid})"
            if backend.owner == backend.uid
            else f"uid {backend.owner}",
            detail=reason.detail,
            setupTool=self.setupTool,
        )
        problem = reason.template.format(**fields)
        if reason.advice is None:
            return problem.rstrip(".") + "."
        own = reason.advice.format(**fields)
        if self.site is not None:
            own = self.site.replace("{advice}", own) if "{advice}" in self.site else self.site
        return f"{problem}; {own.rstrip('.')}."


_START_DAEMON = (
    "start your rootless daemon with `systemctl --user start docker` (set it "
    "up once with `{setupTool} install --force`)"
)


class BackendUnusable(Exception):
    """
    Why a client can't be connected to its daemon: a cause for the log, an
    HTTP status and one actionable sentence for the client's docker CLI
    (what is wrong, L{template}, then what to do, L{advice}; see L{Advice}).
    """

    cause: ClassVar[str] = "unusable"
    status: ClassVar[int] = 502
    # Whether to read the request before answering (see ErrorResponder).
    waitForRequest: ClassVar[bool] = True
    # Whether it says something about what is at the path, which the client
    # may only read if they could see it for themselves (see forTheUser).
    aboutThePath: ClassVar[bool] = True
    template: ClassVar[str] = (
        "docker-router cannot use {path} for user {user} (uid {uid}): {detail}"
    )
    advice: ClassVar[Optional[str]] = None

    def __init__(self, backend: Backend, detail: str = "") -> None:
        super().__init__(backend, detail)
        self.backend = backend
        self.detail = detail

    @property
    def message(self) -> str:
        """The message with the router's own advice."""
        return Advice().render(self)

    def short(self) -> str:
        """What is wrong at the path, in a few words (for L{NoneWorked})."""
        return self.brief.format(detail=self.detail)

    # What is wrong at the path, in a few words, for a chain's message.
    brief: ClassVar[str] = "cannot be used ({detail})"

    def __str__(self) -> str:
        return self.message


class NoDaemon(BackendUnusable):
    cause = "missing"
    brief = "nothing there"
    status = 503
    template = (
        "No Docker daemon is running for user {user} (uid {uid}): there is "
        "nothing at {path}"
    )
    advice = (
        _START_DAEMON + ", and ask an administrator to run `loginctl "
        "enable-linger {user}` to keep it running after you log out"
    )


class NoRuntimeDirectory(NoDaemon):
    brief = "no runtime directory {detail} (not logged in, no linger)"
    template = (
        "No Docker daemon is running for user {user} (uid {uid}): there is "
        "nothing at {path}, because the user has no runtime directory "
        "{detail} (they are not logged in, and have no linger)"
    )
    advice = (
        "log in, or ask an administrator to run `loginctl enable-linger "
        "{user}` so that it exists without a login, then " + _START_DAEMON
    )


class DanglingLink(NoDaemon):
    brief = "a symbolic link to {detail}, which does not exist"
    template = (
        "No Docker daemon is running for user {user} (uid {uid}): {path} is "
        "a symbolic link to {detail}, which does not exist"
    )
    advice = _START_DAEMON + " or point the link at its socket"


class DaemonRefuses(BackendUnusable):
    cause = "refused"
    brief = "refuses connections (a stale socket)"
    status = 503
    template = (
        "The Docker daemon socket of user {user} (uid {uid}) at {path} "
        "refuses connections: the daemon has stopped and left a stale socket"
    )
    advice = "restart it with `systemctl --user restart docker`"


class NotASocket(BackendUnusable):
    cause = "not-a-socket"
    brief = "not a socket"
    template = (
        "{path}, where the Docker daemon of user {user} (uid {uid}) should "
        "listen, is not a socket"
    )
    advice = "remove it and start your rootless daemon with `systemctl --user start docker`"


class WrongOwner(BackendUnusable):
    cause = "wrong-owner"
    status = 403
    template = (
        "The socket at {path} belongs to uid {detail}, not to {whose}, so "
        "docker-router refuses to connect you to it for safety"
    )
    advice = "point {path} at your own rootless Docker daemon"


class RouterLoop(BackendUnusable):
    cause = "loop"
    status = 403
    template = (
        "{path} leads back to docker-router itself, not to a Docker daemon "
        "of {whose}"
    )
    advice = "point it at your own rootless daemon (`systemctl --user start docker`)"


class ConnectTimeout(BackendUnusable):
    cause = "timeout"
    status = 504
    template = (
        "The Docker daemon of user {user} (uid {uid}) at {path} did not "
        "accept the connection within {detail} seconds; it may be hung or "
        "overloaded"
    )
    advice = "check it with `systemctl --user status docker`"


class PathHung(BackendUnusable):
    """
    Looking at the path did not end in time: a file system that doesn't
    answer (a hung NFS server, a FUSE mount that never replies).  The
    client reads the concealed sentence (walking the path as them would
    hang as well); the operator's log names the cause.
    """

    cause = "path-timeout"
    status = 504
    template = (
        "docker-router could not look at {path} for user {user} (uid {uid}) "
        "within {detail} seconds: a file system on the way does not answer"
    )
    advice = "check the file systems the path leads through"


class PermissionDenied(BackendUnusable):
    cause = "permission"
    template = (
        "docker-router was denied permission to connect to {path} for user "
        "{user} (uid {uid}) ({detail})"
    )
    advice = "make sure the socket and the directories above it are reachable"


class Concealed(BackendUnusable):
    """
    What the client reads about a path that leads where they can't look:
    one sentence whatever is there, so that the router's answer can't tell
    them what root sees.  The operator's log keeps the real cause.
    """

    status = 502
    template = (
        "docker-router cannot use {path} for user {user} (uid {uid}): it "
        "does not lead to a Docker daemon socket of this user that "
        "docker-router can use"
    )
    advice = "point it at your own rootless Docker daemon (`systemctl --user start docker`)"
    brief = "not a Docker daemon socket of this user that docker-router can use"

    def __init__(self, reason: BackendUnusable) -> None:
        super().__init__(reason.backend)
        self.reason = reason
        self.cause = reason.cause  # type: ignore[misc]  # the concealed reason's cause, for the log and metrics


class Denied(BackendUnusable):
    """A rule refuses the client: the site's message, as it is."""

    cause = "denied"
    status = 403
    aboutThePath = False
    template = "{detail}"


class NoRoute(BackendUnusable):
    """The configuration leaves a client no path to try (a rule's mistake)."""

    aboutThePath = False
    template = "docker-router has no Docker daemon socket to try for user {user} (uid {uid}): {detail}"
    advice = "ask the administrator to check docker-router's configuration"


class LookupFailed(BackendUnusable):
    """The user database failed to answer what routing needed."""

    cause = "lookup"
    status = 503
    aboutThePath = False
    template = (
        "docker-router could not look up user {user} (uid {uid}) in the "
        "user database ({detail}); try again in a moment"
    )


class NoneWorked(NoDaemon):
    """
    Every socket of the chain is missing, refuses or is not a socket: one
    message with each path tried and why (each reason as the client may
    read it, see L{forTheUser}).
    """

    aboutThePath = False
    template = "No Docker daemon is running for user {user} (uid {uid}): {detail}"

    def __init__(self, backend: Backend, tried: Sequence[BackendUnusable]) -> None:
        detail = "; ".join(f"{reason.backend.path}: {reason.short()}" for reason in tried)
        super().__init__(backend, f"tried {detail}")
        self.tried = tuple(tried)


class TooManyForUser(BackendUnusable):
    cause = "too-many"
    status = 429
    waitForRequest = False
    aboutThePath = False
    template = (
        "docker-router allows user {user} (uid {uid}) at most {detail} "
        "connections at once; close some (idle `docker events`, `logs -f` or "
        "attach sessions) and try again ({path})"
    )


class TooManyInTotal(BackendUnusable):
    cause = "too-many"
    status = 429
    waitForRequest = False
    aboutThePath = False
    template = (
        "docker-router is serving its limit of {detail} connections, so it "
        "cannot take this one for user {user} (uid {uid}, {path}) now; try "
        "again in a moment"
    )


class RouterOutOfDescriptors(BackendUnusable):
    cause = "router-busy"
    status = 503
    aboutThePath = False
    template = (
        "docker-router has run out of file descriptors ({detail}) and cannot "
        "connect user {user} (uid {uid}) to {path} now; try again in a moment"
    )


def checkSocketFile(backend: Backend, target: os.stat_result) -> None:
    """
    Before connecting: the file the path leads to must be a socket owned by
    the uid the daemon must run as.  Root connects to nothing else, so a
    user can't make it knock on another user's socket (a systemd
    C{Accept=yes} socket starts a service per connection).

    @raise BackendUnusable: when it must not be connected.
    """
    if not stat.S_ISSOCK(target.st_mode):
        raise NotASocket(backend)
    if target.st_uid != backend.owner:
        raise WrongOwner(backend, str(target.st_uid))


def verifyDaemon(backend: Backend, daemon: Credentials, routerPid: int) -> None:
    """
    The security boundary: the process listening at the other end of the
    backend connection must run as the uid the client may reach (its own,
    or the owner a rule names).  This looks
    at the daemon actually connected, so symlinks and races on the path can't
    smuggle a client to anyone else's daemon (or back to the router, where the
    inner hop would arrive as root).

    @raise BackendUnusable: when the daemon must not be used.
    """
    if daemon.pid == routerPid:
        raise RouterLoop(backend)
    if daemon.uid != backend.owner:
        raise WrongOwner(backend, str(daemon.uid))


def explainConnectFailure(backend: Backend, reason: OSError) -> BackendUnusable:
    """
    Turn a failed open or connect into the reason the operator should read
    (L{forTheUser} decides what the client reads).
    """
    number = reason.errno
    if number == errno.ENOENT:
        return NoDaemon(backend)
    if number == errno.ECONNREFUSED:
        return DaemonRefuses(backend)
    if number in (errno.EMFILE, errno.ENFILE):
        return RouterOutOfDescriptors(backend, os.strerror(number))
    if number in (errno.EACCES, errno.EPERM):
        return PermissionDenied(backend, os.strerror(number))
    return BackendUnusable(backend, os.strerror(number) if number else str(reason))


def forTheUser(
    reason: BackendUnusable,
    target: Optional[os.stat_result],
    sight: Union[Found, Missing, None],
) -> BackendUnusable:
    """
    C{reason} as the client may read it.  The router looks with root's
    eyes; the client learns specifically what is wrong only when they could
    have seen it for themselves (C{sight}: the path walked with their own
    credentials, see L{dockerrouter.routing.visibility.look}), and only when that
    agrees with what the router met: the file it opened (C{target}), or
    nothing there.  Anything else reads as one L{Concealed} sentence.
    """
    if not reason.aboutThePath:
        return reason
    if isinstance(reason, NoDaemon) and isinstance(sight, Missing):
        if sight.link is not None:
            return DanglingLink(reason.backend, sight.link[1])
        if sight.where == f"/run/user/{reason.backend.uid}":
            return NoRuntimeDirectory(reason.backend, sight.where)
        return reason
    if (
        target is not None
        and isinstance(sight, Found)
        and (sight.dev, sight.ino) == (target.st_dev, target.st_ino)
    ):
        return reason
    return Concealed(reason)
