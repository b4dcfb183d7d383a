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
import stat
from typing import Callable, ClassVar, Optional

from attrs import frozen

from dockerrouter.credentials import Credentials

DEFAULT_TEMPLATE = "/run/user/{uid}/docker.sock"


@frozen
class Backend:
    """
    Where one client's connection goes, and who must be listening there.

    @ivar uid: the uid the daemon at C{path} must run as.
    @ivar user: the name of that uid, or the uid as text when the user
        database has none (the connection still routes by number).
    """

    path: str
    uid: int
    user: str


def userName(uid: int) -> str:
    """
    The name of C{uid} from the system user database (NSS, so LDAP and SSSD
    users have one too), or the number as text.
    """
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class RecentNames:
    """
    L{userName}, remembered for C{ttl} seconds: an NSS lookup (a scan of
    C{/etc/passwd}, or a round trip to LDAP) per connection would cost more
    than the relay, and a renamed user may wait a minute for their new path.
    """

    def __init__(self, clock: Callable[[], float], ttl: float = 60.0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._names: dict[int, tuple[float, str]] = {}

    def __call__(self, uid: int) -> str:
        now = self._clock()
        known = self._names.get(uid)
        if known is not None and known[0] > now:
            return known[1]
        if len(self._names) > 100_000:
            self._names.clear()
        name = userName(uid)
        self._names[uid] = (now + self._ttl, name)
        return name


class BackendResolver:
    """
    Fills the socket path template for a client: its own uid's, or, for a
    uid in a user's subordinate range (a process in that user's rootless
    container), the owning user's.
    """

    def __init__(
        self,
        template: str,
        lookupName: Callable[[int], str] = userName,
        subordinates: Optional["SubordinateIds"] = None,
    ) -> None:
        self.template = template
        self._lookupName = lookupName
        self._subordinates = subordinates

    def resolve(self, client: Credentials) -> Backend:
        uid = client.uid
        if self._subordinates is not None:
            uid = self._subordinates.owner(uid)
        user = self._lookupName(uid)
        return Backend(path=self.template.format(uid=uid, user=user), uid=uid, user=user)


class SubordinateIds:
    """
    The owners of the subordinate uid ranges in C{/etc/subuid}, re-read when
    the file changes.

    Inside a user's rootless container, root is the user and every other uid
    is one of their subordinate ids; those processes belong to that user's
    daemon.  Lines that are broken, name an unknown user or overlap another
    range are ignored (an id claimed twice has no owner we could trust),
    with a warning from C{warn}.  uid 0 never maps to anyone.

    The file is looked at (one C{stat}) at most once a second, not on every
    connection.
    """

    checkInterval = 1.0

    def __init__(
        self, path: str, warn: Callable[[str], None], clock: Callable[[], float]
    ) -> None:
        self.path = path
        self._warn = warn
        self._clock = clock
        self._nextCheck = float("-inf")
        self._stamp: Optional[tuple] = None
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, int]] = []

    def owner(self, uid: int) -> int:
        """The uid that owns C{uid}: its range's owner, or C{uid} itself."""
        if uid == 0:
            return uid
        self._refresh()
        i = bisect.bisect_right(self._starts, uid) - 1
        if i >= 0:
            start, count, owner = self._ranges[i]
            if uid < start + count:
                return owner
        return uid

    def reload(self) -> str:
        """Read the file now, changed or not (SIGHUP); say what was read."""
        self._nextCheck = float("-inf")
        self._stamp = None
        self._refresh()
        return f"{len(self._ranges)} subordinate uid ranges from {self.path}"

    def _refresh(self) -> None:
        now = self._clock()
        if now < self._nextCheck:
            return
        self._nextCheck = now + self.checkInterval
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        self._ranges = self._parse(text)
        self._starts = [start for start, _, _ in self._ranges]

    def _parse(self, text: str) -> list[tuple[int, int, int]]:
        ranges = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                name, start, count = line.strip().split(":")
                start, count = int(start), int(count)
                if start <= 0 or count <= 0:
                    raise ValueError("not a positive range")
                owner = int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
            except (ValueError, KeyError) as e:
                self._warn(f"{self.path}:{number}: ignored ({e}): {line!r}")
                continue
            ranges.append((start, count, owner, number))
        ranges.sort()
        overlapping = set()
        for (s1, c1, _, n1), (s2, _, _, n2) in zip(ranges, ranges[1:]):
            if s2 < s1 + c1:
                overlapping.update((n1, n2))
        for number in sorted(overlapping):
            self._warn(f"{self.path}:{number}: ignored (its range overlaps another)")
        return [(s, c, o) for s, c, o, n in ranges if n not in overlapping]


class BackendUnusable(Exception):
    """
    Why a client can't be connected to its daemon: a cause for the log, an
    HTTP status and one actionable sentence for the client's docker CLI.
    """

    cause: ClassVar[str] = "unusable"
    status: ClassVar[int] = 502
    # Whether to read the request before answering (see ErrorResponder).
    waitForRequest: ClassVar[bool] = True
    template: ClassVar[str] = (
        "docker-router cannot use {path} for user {user} (uid {uid}): "
        "{detail}."
    )

    def __init__(self, backend: Backend, detail: str = "") -> None:
        super().__init__(backend, detail)
        self.backend = backend
        self.detail = detail

    @property
    def message(self) -> str:
        return self.template.format(
            path=self.backend.path,
            user=self.backend.user,
            uid=self.backend.uid,
            detail=self.detail,
        )

    def __str__(self) -> str:
        return self.message


class NoDaemon(BackendUnusable):
    cause = "missing"
    status = 503
    template = (
        "No Docker daemon is running for user {user} (uid {uid}): there is "
        "nothing at {path}; start your rootless daemon with "
        "`systemctl --user start docker` (set it up once with "
        "`dockerd-rootless-setuptool.sh install --force`) and run "
        "`loginctl enable-linger {user}` to keep it running after you log out."
    )


class DaemonRefuses(BackendUnusable):
    cause = "refused"
    status = 503
    template = (
        "The Docker daemon socket of user {user} (uid {uid}) at {path} "
        "refuses connections: the daemon has stopped and left a stale "
        "socket; restart it with `systemctl --user restart docker`."
    )


class NotASocket(BackendUnusable):
    cause = "not-a-socket"
    template = (
        "{path}, where the Docker daemon of user {user} (uid {uid}) should "
        "listen, is not a socket; remove it and start your rootless daemon "
        "with `systemctl --user start docker`."
    )


class WrongOwner(BackendUnusable):
    cause = "wrong-owner"
    status = 403
    template = (
        "The daemon at {path} runs as uid {detail}, not as user {user} "
        "(uid {uid}), so docker-router refuses to connect you to it for "
        "safety; point {path} at your own rootless Docker daemon."
    )


class RouterLoop(BackendUnusable):
    cause = "loop"
    status = 403
    template = (
        "{path} leads back to docker-router itself, not to a Docker daemon "
        "of user {user} (uid {uid}); point it at your own rootless daemon "
        "(`systemctl --user start docker`)."
    )


class ConnectTimeout(BackendUnusable):
    cause = "timeout"
    status = 504
    template = (
        "The Docker daemon of user {user} (uid {uid}) at {path} did not "
        "accept the connection within {detail} seconds; it may be hung or "
        "overloaded: check it with `systemctl --user status docker`."
    )


class PermissionDenied(BackendUnusable):
    cause = "permission"
    template = (
        "docker-router was denied permission to connect to {path} for user "
        "{user} (uid {uid}); make sure the socket and the directories above "
        "it are reachable ({detail})."
    )


class TooManyForUser(BackendUnusable):
    cause = "too-many"
    status = 429
    waitForRequest = False
    template = (
        "docker-router allows user {user} (uid {uid}) at most {detail} "
        "connections at once; close some (idle `docker events`, `logs -f` or "
        "attach sessions) and try again ({path})."
    )


class TooManyInTotal(BackendUnusable):
    cause = "too-many"
    status = 429
    waitForRequest = False
    template = (
        "docker-router is serving its limit of {detail} connections, so it "
        "cannot take this one for user {user} (uid {uid}, {path}) now; try "
        "again in a moment."
    )


class RouterOutOfDescriptors(BackendUnusable):
    cause = "router-busy"
    status = 503
    template = (
        "docker-router has run out of file descriptors ({detail}) and cannot "
        "connect user {user} (uid {uid}) to {path} now; try again in a moment."
    )


def verifyDaemon(backend: Backend, daemon: Credentials, routerPid: int) -> None:
    """
    The security boundary: the process listening at the other end of the
    backend connection must run as the uid the client may reach.  This looks
    at the daemon actually connected, so symlinks and races on the path can't
    smuggle a client to anyone else's daemon (or back to the router, where the
    inner hop would arrive as root).

    @raise BackendUnusable: when the daemon must not be used.
    """
    if daemon.pid == routerPid:
        raise RouterLoop(backend)
    if daemon.uid != backend.uid:
        raise WrongOwner(backend, str(daemon.uid))


def explainConnectFailure(backend: Backend, reason: OSError) -> BackendUnusable:
    """
    Turn a failed connect into the reason the user should read.
    """
    number = reason.errno
    if number == errno.ENOENT:
        return NoDaemon(backend)
    if number == errno.ECONNREFUSED:
        # connect() says "refused" for any non-socket file as well.
        if _isNonSocket(backend.path):
            return NotASocket(backend)
        return DaemonRefuses(backend)
    if number in (errno.EMFILE, errno.ENFILE):
        return RouterOutOfDescriptors(backend, os.strerror(number))
    if number in (errno.EACCES, errno.EPERM):
        return PermissionDenied(backend, os.strerror(number))
    return BackendUnusable(backend, os.strerror(number) if number else str(reason))


def _isNonSocket(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISSOCK(mode)

