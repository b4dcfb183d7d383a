"""
On-demand start of a user's rootless daemon through systemd (C{--start
systemd}).

When a user's daemon is not there, the router can ask systemd to start it
rather than refuse: the system manager starts the user's manager
(C{user@UID.service}), and the user's manager the units the user enabled
(C{docker.service}, or C{podman.socket}).  The client waits, its bytes held
in the kernel, until the daemon answers or the start times out.

The user's manager is started only for something: which units the user
enabled is read first, as the user (see L{Starter._enabledCommand}).  A
manager the router started is stopped again when nothing came of it.  And a
manager logind is tearing down (its user's last session just ended) is
waited out, then started afresh: a daemon started in it would die with it.

One start is in flight per user (everyone of that user waits on it); after
a failed one, the user's next connections are answered at once for a
cool-down; system accounts (below C{UID_MIN}) and users without a home are
never started.  Nothing here blocks the reactor: C{systemctl} runs as a
child process, the user database is read in a thread, and whether the
daemon answers yet is asked in a worker (see L{dockerrouter.relay.workers}).
"""

import os
import pwd
from typing import Any, Callable, ClassVar, Optional, Protocol

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from dockerrouter.routing.reasons import BackendUnusable
from dockerrouter.routing.route import Backend
from dockerrouter.routing.subordinates import loginDefsUidMin
from dockerrouter.base.logging import RouterLogger

# The user units that serve a Docker API socket, started when enabled, and
# the target whose .wants directory enabling them links them into.
UNITS = {"docker.service": "default.target.wants", "podman.socket": "sockets.target.wants"}
# Where those links are: the user's own (`systemctl --user enable`), and the
# admin's for everyone (`systemctl --global enable`).
_UNIT_DIRECTORIES = ("{home}/.config/systemd/user", "/etc/systemd/user")
# Prints each unit whose link resolves (run as the user: see _enabledCommand).
_ENABLED_SCRIPT = 'for link do [ -e "$link" ] && echo "${link##*/}"; done; exit 0'
# Every result a start (or a connection that wanted one) is counted by.
RESULTS = ("started", "failed", "timeout", "not-enabled", "cooling-down", "refused")
COOL_DOWN = 60.0
_POLL = 0.1
# How often a teardown in progress is looked at again.
_TEARDOWN_POLL = 0.5
# How long a manager whose user logind is closing is waited for to go: its
# stop delay (UserStopDelaySec=, 10 s by default) and its stop.  A user with
# processes left in a closed session stays "closing" with a running manager
# for good: after this, the start goes on in that manager.
CLOSING_WAIT = 15.0
# What the systemctl children get: no environment of the router's.
_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

ProcessResult = tuple[bytes, bytes, int]
Runner = Callable[[list[str]], "Deferred[ProcessResult]"]


class StartFailed(BackendUnusable):
    """The router asked systemd to start the user's daemon, and it did not come."""

    cause = "start-failed"
    status = 503
    aboutThePath = False
    template = (
        "No Docker daemon is running for user {user} (uid {uid}) at {path}, "
        "and docker-router could not start it through systemd: {detail}"
    )
    advice = "check it with `systemctl --user status docker` (or `docker-router doctor`)"


class StartTimedOut(StartFailed):
    cause = "start-timeout"
    status = 504
    template = (
        "docker-router asked systemd to start the Docker daemon of user "
        "{user} (uid {uid}), but nothing answered at {path} within {detail} seconds"
    )


class NotEnabled(StartFailed):
    cause = "start-not-enabled"
    template = (
        "No Docker daemon is running for user {user} (uid {uid}) at {path}, "
        "and docker-router could not start one: the user has enabled none of "
        "{detail}"
    )
    advice = (
        "set it up once with `{setupTool} install --force`, then "
        "`systemctl --user enable --now docker`"
    )


class Provisions(Protocol):
    """Sets up a user's daemon when nothing is enabled (L{dockerrouter.service.provision})."""

    def provision(self, backend: Backend, ready: Callable[[], "Deferred[bool]"]) -> "Deferred[Optional[BackendUnusable]]":
        ...

    def refusal(self, backend: Backend, why: str) -> BackendUnusable:
        ...


class _Collect(ProcessProtocol):
    """A child's output and exit status; cancelling kills it."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: Deferred = Deferred(self._kill)

    def _kill(self, _: Deferred) -> None:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]  # a process transport, set before any kill
        except Exception:
            pass  # already gone

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        if self.done.called:
            return
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.done.callback((b"".join(self.out), b"".join(self.err), -1 if code is None else code))


def processRunner(reactor: Any) -> Runner:
    """Runs a command as a child of C{reactor}: its output and exit status."""

    def run(argv: list[str]) -> "Deferred[ProcessResult]":
        collect = _Collect()
        reactor.spawnProcess(collect, argv[0], argv, env=_ENVIRONMENT)
        return collect.done

    return run


def homeOf(uid: int) -> Optional[str]:
    """
    The home directory of C{uid} when it exists, else C{None}.  (It may ask
    LDAP or SSSD: call it in a thread.)
    """
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None
    return home if home not in ("", "/") and os.path.isdir(home) else None


def _lastLine(data: bytes) -> str:
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


class _Attempt:
    """One start of one user's daemon, and the connections waiting on it."""

    def __init__(
        self, backend: Backend, began: float, timeout: float, ready: Callable[[], "Deferred[bool]"]
    ) -> None:
        self.backend = backend
        self.began = began
        self.timeout = timeout
        self.ready = ready
        self.units: list[str] = []
        self.waiting: list[Deferred] = []
        self.child: Optional[Deferred] = None
        self.timer: Optional[IDelayedCall] = None
        self.poll: Optional[IDelayedCall] = None
        self.outcome: Optional[str] = None
        # The user's manager was not running, and this start started it.
        self.startedManager = False


class Starter:
    """
    Starts users' daemons through systemd, one start in flight per user.

    @ivar counts: start requests by result (see L{RESULTS}), for metrics.
    """

    log = RouterLogger()
    systemctl: ClassVar[str] = "/usr/bin/systemctl"
    systemdRun: ClassVar[str] = "/usr/bin/systemd-run"
    # With --provision: who sets up a daemon for a user with none enabled.
    provisioner: Optional[Provisions] = None
    loginctl: ClassVar[str] = "/usr/bin/loginctl"

    def __init__(
        self,
        reactor: Any,
        probe: Callable[[Backend], "Deferred[bool]"],
        run: Optional[Runner] = None,
        home: Optional[Callable[[int], "Deferred[Optional[str]]"]] = None,
        uidMin: Optional[int] = None,
        coolDown: float = COOL_DOWN,
        units: dict[str, str] = UNITS,
    ) -> None:
        """
        @param probe: whether a daemon of the backend's user answers now
            (asked off the reactor thread: it looks at the user's path).
        @param run: runs a command (default: a child process).
        @param home: the user's home directory, or C{None} (default: looked
            up in a thread).
        @param units: the units to start, each with the C{.wants} directory
            that enabling it links it into.
        """
        self.reactor = reactor
        self.probe = probe
        self.run = run or processRunner(reactor)
        self.home = home or (lambda uid: threads.deferToThread(homeOf, uid))
        self.uidMin = loginDefsUidMin() if uidMin is None else uidMin
        self.coolDown = coolDown
        self.units = units
        self.counts = dict.fromkeys(RESULTS, 0)
        self._attempts: dict[int, _Attempt] = {}
        # uid -> (until when, what to answer meanwhile)
        self._cooling: dict[int, tuple[float, Optional[BackendUnusable]]] = {}

    def start(
        self, backend: Backend, timeout: float, ready: Optional[Callable[[], "Deferred[bool]"]] = None
    ) -> "Deferred[Optional[BackendUnusable]]":
        """
        Start the daemon of C{backend}'s user, or join the start in flight.

        @param ready: whether a daemon of the user answers now (for a chain
            of sockets: any of them); default: the probe, at C{backend}.
        @return: fires with C{None} when it is worth connecting again (a
            daemon answers, or no start was made: the client's own reason
            stands), or with the reason to answer the client.  Cancelling
            it stops only this caller's wait.
        """
        uid = backend.uid
        now = self.reactor.seconds()
        cooling = self._cooling.get(uid)
        if cooling is not None:
            if cooling[0] > now:
                self.counts["cooling-down"] += 1
                return defer.succeed(cooling[1])
            del self._cooling[uid]
        attempt = self._attempts.get(uid)
        first = attempt is None
        if attempt is None:
            if uid < self.uidMin:
                return self._refuse(backend, f"uid {uid} is below UID_MIN {self.uidMin}")
            attempt = self._attempts[uid] = _Attempt(
                backend, now, timeout, ready or (lambda: self.probe(backend))
            )

        def stopWaiting(d: Deferred) -> None:
            if d in attempt.waiting:
                attempt.waiting.remove(d)

        waiter: Deferred = Deferred(stopWaiting)
        attempt.waiting.append(waiter)
        if first:
            attempt.timer = self.reactor.callLater(timeout, self._timedOut, attempt, timeout)
            self._step(attempt, self.home(uid), self._gotHome)
        return waiter

    def _refuse(self, backend: Backend, why: str) -> "Deferred[Optional[BackendUnusable]]":
        """No start for this user: say so once per cool-down."""
        self.counts["refused"] += 1
        # With --provision, the client hears why nothing is set up either.
        answer = None if self.provisioner is None else self.provisioner.refusal(backend, why)
        self._cooling[backend.uid] = (self.reactor.seconds() + self.coolDown, answer)
        self.log.info(
            "start: not starting a daemon for user {user} (uid {uid}): {why}",
            user=backend.user,
            uid=backend.uid,
            why=why,
        )
        return defer.succeed(answer)

    def _step(self, attempt: _Attempt, d: Deferred, then: Callable) -> None:
        """Wait for one step of C{attempt} (cancelled if it times out)."""
        attempt.child = d
        d.addCallback(lambda result: then(attempt, result) if attempt.outcome is None else None)
        d.addErrback(self._broken, attempt)

    def _broken(self, failure: Failure, attempt: _Attempt) -> None:
        if attempt.outcome is None:
            self._finish(attempt, "failed", StartFailed(attempt.backend, failure.getErrorMessage()))

    def _asTheUser(self, attempt: _Attempt, *argv: str) -> list[str]:
        """
        C{argv} run as the user by the system manager, killed by it if it
        outlives the start.  (The router can't switch users itself: its
        sandbox has neither C{CAP_SETUID} nor new privileges.  Nor is it
        C{systemctl --user -M USER@}: that opens a login session, and when
        it closes logind stops the user's manager, and the daemon with it,
        a few seconds later.)
        """
        backend = attempt.backend
        return [
            self.systemdRun,
            # The number that was verified, not a name looked up again.
            f"--uid={backend.uid}",
            "--no-ask-password",
            "--pipe",
            "--wait",
            "--quiet",
            "--collect",
            f"--property=RuntimeMaxSec={attempt.timeout:g}",
            f"--setenv=XDG_RUNTIME_DIR=/run/user/{backend.uid}",
            # systemd expands $NAME in a command line at exec ($$ is a $).
            *(argument.replace("$", "$$") for argument in argv),
        ]

    def _enabledCommand(self, attempt: _Attempt, home: str) -> list[str]:
        """
        Which of the units the user enabled: a shell run as the user lists
        those whose C{.wants} link resolves, in their home or for everyone.

        Asked before the user's manager runs (C{systemctl --user} needs it
        running; the link is what C{systemctl --user enable} makes), and as
        the user: whatever they linked, their home is looked at with their
        rights, never root's.
        """
        links = [
            f"{directory.format(home=home)}/{wants}/{unit}"
            for unit, wants in self.units.items()
            for directory in _UNIT_DIRECTORIES
        ]
        return self._asTheUser(attempt, "/bin/sh", "-c", _ENABLED_SCRIPT, "sh", *links)

    def _gotHome(self, attempt: _Attempt, home: Optional[str]) -> None:
        backend = attempt.backend
        if home is None:
            self._cleanUp(attempt)
            self._refuse(backend, "the user has no home directory").addCallback(lambda answer: self._answer(attempt, answer))
            return
        self._step(attempt, self.run(self._enabledCommand(attempt, home)), self._enabled)

    def _enabled(self, attempt: _Attempt, result: ProcessResult) -> None:
        out, _, _ = result
        if self._failed(attempt, result, "the look for enabled units"):
            return
        listed = set(out.decode("utf-8", "replace").split())
        units = [unit for unit in self.units if unit in listed]
        if not units and self.provisioner is not None:
            # Setting one up has its own deadline (--provision-timeout).
            if attempt.timer is not None and attempt.timer.active():
                attempt.timer.cancel()
            attempt.timer = None
            self._step(attempt, self.provisioner.provision(attempt.backend, attempt.ready), self._provisioned)
            return
        if not units:
            self._finish(attempt, "not-enabled", NotEnabled(attempt.backend, " or ".join(self.units)))
            return
        attempt.units = units
        self._lookAtManager(attempt)

    def _lookAtManager(self, attempt: _Attempt) -> None:
        """Is the user's manager running, starting, or going away?"""
        attempt.poll = None
        uid = attempt.backend.uid
        command = [
            self.systemctl, "show", "--property=ActiveState", "--value",
            f"user@{uid}.service", f"user-runtime-dir@{uid}.service",
        ]
        self._step(attempt, self.run(command), self._gotManagerState)

    def _gotManagerState(self, attempt: _Attempt, result: ProcessResult) -> None:
        if self._failed(attempt, result, f"systemctl show user@{attempt.backend.uid}.service"):
            return
        states = result[0].decode("utf-8", "replace").split()
        if "deactivating" in states:
            self._waitOutTeardown(attempt)
            return
        up = states[:1] in (["active"], ["activating"], ["reloading"])
        # Up or not, logind may be about to stop it, or be still tidying up.
        command = [self.loginctl, "show-user", str(attempt.backend.uid), "--property=State", "--value"]
        self._step(attempt, self.run(command), lambda attempt, result: self._gotUserState(attempt, result, up))

    def _gotUserState(self, attempt: _Attempt, result: ProcessResult, up: bool) -> None:
        """
        C{closing}: the user's last session ended, and logind stops their
        manager after its stop delay and then removes their runtime
        directory; a start in between dies with the manager, or waits on a
        directory being removed.  Unless closing takes longer than a stop
        delay (a closed session that keeps processes), wait for it to end.
        """
        closing = result[0].decode("utf-8", "replace").strip() == "closing"
        if closing and self.reactor.seconds() - attempt.began < CLOSING_WAIT:
            self._waitOutTeardown(attempt)
        elif up:
            self._startUnits(attempt)
        else:
            attempt.startedManager = True
            command = [self.systemctl, "start", f"user@{attempt.backend.uid}.service"]
            self._step(attempt, self.run(command), self._userManager)

    def _waitOutTeardown(self, attempt: _Attempt) -> None:
        attempt.child = None
        attempt.poll = self.reactor.callLater(_TEARDOWN_POLL, self._lookAtManager, attempt)

    def _userManager(self, attempt: _Attempt, result: ProcessResult) -> None:
        if self._failed(attempt, result, f"systemctl start user@{attempt.backend.uid}.service"):
            return
        self._startUnits(attempt)

    def _startUnits(self, attempt: _Attempt) -> None:
        command = self._asTheUser(attempt, self.systemctl, "--user", "start", *attempt.units)
        self._step(attempt, self.run(command), self._unitsStarted)

    def _provisioned(self, attempt: _Attempt, reason: Optional[BackendUnusable]) -> None:
        attempt.child = None
        attempt.units = ["the daemon it set up"]
        self._finish(attempt, "started" if reason is None else "failed", reason)

    def _unitsStarted(self, attempt: _Attempt, result: ProcessResult) -> None:
        if self._failed(attempt, result, "systemctl --user start " + " ".join(attempt.units)):
            return
        attempt.child = None
        self._poll(attempt)

    def _poll(self, attempt: _Attempt) -> None:
        """A unit may answer a moment after systemctl returns (Type=simple)."""
        attempt.poll = None
        self._step(attempt, attempt.ready(), self._polled)

    def _polled(self, attempt: _Attempt, ready: bool) -> None:
        attempt.child = None
        if ready:
            self._finish(attempt, "started", None)
        else:
            attempt.poll = self.reactor.callLater(_POLL, self._poll, attempt)

    def _failed(self, attempt: _Attempt, result: ProcessResult, command: str) -> bool:
        _, err, code = result
        if code == 0:
            return False
        why = _lastLine(err) or f"exit status {code}"
        self._finish(attempt, "failed", StartFailed(attempt.backend, f"`{command}` failed: {why}"))
        return True

    def _timedOut(self, attempt: _Attempt, timeout: float) -> None:
        attempt.timer = None
        self._finish(attempt, "timeout", StartTimedOut(attempt.backend, f"{timeout:g}"))

    def _finish(self, attempt: _Attempt, outcome: str, reason: Optional[BackendUnusable]) -> None:
        """The start is over: count it, log one line, answer everyone waiting."""
        attempt.outcome = outcome
        self._cleanUp(attempt)
        self.counts[outcome] += 1
        backend = attempt.backend
        if reason is None:
            self.log.info(
                "start: started {units} of user {user} (uid {uid}) through "
                "systemd; it answers after {seconds:.1f}s",
                units=" ".join(attempt.units),
                user=backend.user,
                uid=backend.uid,
                seconds=self.reactor.seconds() - attempt.began,
            )
        else:
            self._cooling[backend.uid] = (self.reactor.seconds() + self.coolDown, reason)
            self.log.warn(
                "start: {outcome} for user {user} (uid {uid}): {reason}; the next "
                "start is tried after {coolDown:g}s",
                outcome=outcome,
                user=backend.user,
                uid=backend.uid,
                reason=reason.message,
                coolDown=self.coolDown,
            )
            if attempt.startedManager:
                self._stopManager(backend)
        self._answer(attempt, reason)

    def _stopManager(self, backend: Backend) -> None:
        """
        Stop the user's manager this start started for nothing, unless the
        user logged in meanwhile (their session has it now).
        """
        sessions = self.run([self.loginctl, "show-user", str(backend.uid), "--property=Sessions", "--value"])

        def stop(result: ProcessResult) -> Optional[Deferred]:
            out, _, code = result
            if code == 0 and out.strip():
                return None
            return self.run([self.systemctl, "stop", "--no-block", f"user@{backend.uid}.service"])

        def stopped(result: Optional[ProcessResult]) -> None:
            if result is not None and result[2] != 0:
                self.log.warn(
                    "start: could not stop the manager of user {user} (uid {uid}): {why}",
                    user=backend.user,
                    uid=backend.uid,
                    why=_lastLine(result[1]) or f"exit status {result[2]}",
                )

        sessions.addCallback(stop).addCallback(stopped)
        sessions.addErrback(lambda failure: self.log.failure("start: stopping a manager", failure))

    def _cleanUp(self, attempt: _Attempt) -> None:
        self._attempts.pop(attempt.backend.uid, None)
        for call in (attempt.timer, attempt.poll):
            if call is not None and call.active():
                call.cancel()
        attempt.timer = attempt.poll = None
        child, attempt.child = attempt.child, None
        if child is not None and not child.called:
            child.cancel()

    def _answer(self, attempt: _Attempt, reason: Optional[BackendUnusable]) -> None:
        waiting, attempt.waiting = attempt.waiting, []
        for d in waiting:
            d.callback(reason)
