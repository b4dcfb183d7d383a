"""
Every reason a client's daemon can't be used, and the checks that find
them: the socket file before connecting (L{checkSocketFile}), the daemon
reached (L{verifyDaemon}, the security boundary), a failed connect
(L{explainConnectFailure}), and what of it the client may read
(L{forTheUser}).
"""

import errno
import os
import stat
from typing import ClassVar, Optional, Sequence, Union

from dockerrouter.defaults import SETUP_TOOL
from dockerrouter.routing.credentials import Credentials
from dockerrouter.routing.route import Backend
from dockerrouter.routing.visibility import Found, Missing

_START_DAEMON = (
    "start your rootless daemon with `systemctl --user start docker` (set it "
    "up once with `{setupTool} install --force`)"
)


class BackendUnusable(Exception):
    """
    Why a client can't be connected to its daemon: a cause for the log, an
    HTTP status and one actionable sentence for the client's docker CLI
    (what is wrong, L{template}, then what to do, L{advice}; see L{render}).
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
        return self.render()

    def render(self, setupTool: str = SETUP_TOOL, site: Optional[str] = None) -> str:
        """
        The whole message: what is wrong, then what to do, with the setup
        command of this host and the site's text (see
        L{dockerrouter.routing.advice.Advice}, which holds both).
        """
        backend = self.backend
        fields = dict(
            path=backend.path,
            user=backend.user,
            uid=backend.uid,
            # Whose daemon the path must lead to.
            whose=f"user {backend.user} (uid {backend.uid})"
            if backend.owner == backend.uid
            else f"uid {backend.owner}",
            detail=self.detail,
            setupTool=setupTool,
        )
        problem = self.template.format(**fields)
        if self.advice is None:
            return problem.rstrip(".") + "."
        own = self.advice.format(**fields)
        if site is not None:
            own = site.replace("{advice}", own) if "{advice}" in site else site
        return f"{problem}; {own.rstrip('.')}."

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
