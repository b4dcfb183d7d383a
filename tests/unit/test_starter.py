"""
The on-demand starter with a Clock and a fake process runner: one start in
flight per user, the cool-down, the users it never starts, the timeout; what
the user enabled asked before their manager is started, a manager started for
nothing stopped again, a teardown in progress waited out.
"""

import os

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted.python.failure import Failure

from dockerrouter.service import starter
from dockerrouter.routing.route import Backend
from dockerrouter.service.starter import (
    CLOSING_WAIT,
    NotEnabled,
    StartFailed,
    Starter,
    StartTimedOut,
    processRunner,
)

ALICE = Backend("/run/user/1001/docker.sock", 1001, "alice")
BOB = Backend("/run/user/1002/docker.sock", 1002, "bob")
# What the look for enabled units prints, run as the user.
ENABLED = b"docker.service\n"
# The manager's state (user@, user-runtime-dir@), and logind's of the user.
DOWN = b"inactive\n\ninactive\n"
UP = b"active\n\nactive\n"
NOT_LOGGED_IN = (b"", b"Failed to get user: User ID 1001 is not logged in or lingering\n", 1)
START_MANAGER = ["/usr/bin/systemctl", "start", "user@1001.service"]
STOP_MANAGER = ["/usr/bin/systemctl", "stop", "--no-block", "user@1001.service"]


class FakeRunner:
    """Records each command; the test answers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Deferred]] = []
        self.killed: list[list[str]] = []

    def __call__(self, argv: list[str]) -> Deferred:
        d: Deferred = Deferred(lambda _: self.killed.append(argv))
        self.calls.append((argv, d))
        return d

    def answer(self, out: bytes = b"", err: bytes = b"", code: int = 0, uid: int = 1001) -> list[str]:
        """Finish the oldest pending command about C{uid}; its argv."""
        argv, d = next((a, d) for a, d in self.calls if not d.called and str(uid) in " ".join(a))
        d.callback((out, err, code))
        return argv

    def pending(self) -> list[list[str]]:
        return [argv for argv, d in self.calls if not d.called]

    def ran(self, argv: list[str]) -> bool:
        return any(a == argv for a, _ in self.calls)


class StarterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.up: set[int] = set()
        self.homes = {1001: "/home/alice", 1002: "/home/bob"}
        self.starter = Starter(
            self.clock,
            probe=lambda backend: defer.succeed(backend.uid in self.up),
            run=self.runner,
            home=lambda uid: defer.succeed(self.homes.get(uid)),
            uidMin=1000,
            coolDown=60.0,
        )

    def start(self, backend: Backend = ALICE, timeout: float = 30.0) -> list:
        fired: list = []
        self.starter.start(backend, timeout).addCallback(fired.append)
        return fired

    def userState(self, state: bytes, uid: int = 1001) -> list[str]:
        """Answer logind's state of the user (C{b""}: it doesn't know them)."""
        if state:
            return self.runner.answer(state + b"\n", uid=uid)
        return self.runner.answer(*NOT_LOGGED_IN, uid=uid)

    def upToTheManager(self, uid: int = 1001) -> None:
        """Answer a good start up to the user's manager (not running: started)."""
        self.runner.answer(ENABLED, uid=uid)
        self.runner.answer(DOWN, uid=uid)
        self.userState(b"", uid=uid)

    def startAll(self, uid: int = 1001) -> None:
        """Answer the commands of a good start; the daemon comes up."""
        self.upToTheManager(uid)
        self.runner.answer(uid=uid)
        self.runner.answer(uid=uid)
        self.up.add(uid)

    def test_startsTheUserManagerThenTheEnabledUnits(self) -> None:
        fired = self.start()
        # First, as the user, which units they enabled: no manager yet.
        looking = self.runner.answer(ENABLED)
        self.assertEqual(looking[:2], ["/usr/bin/systemd-run", "--uid=1001"])
        self.assertIn("--property=RuntimeMaxSec=30", looking)
        # systemd would expand the script's $link: escaped for it.
        self.assertIn('for link do [ -e "$$link" ] && echo "$${link##*/}"; done; exit 0', looking)
        self.assertEqual(looking[-4:], [
            "/home/alice/.config/systemd/user/default.target.wants/docker.service",
            "/etc/systemd/user/default.target.wants/docker.service",
            "/home/alice/.config/systemd/user/sockets.target.wants/podman.socket",
            "/etc/systemd/user/sockets.target.wants/podman.socket",
        ])
        self.assertEqual(self.runner.answer(DOWN)[-2:], ["user@1001.service", "user-runtime-dir@1001.service"])
        self.assertEqual(self.userState(b"")[:3], ["/usr/bin/loginctl", "show-user", "1001"])
        self.assertEqual(self.runner.answer(), START_MANAGER)
        starting = self.runner.answer()
        self.assertIn("--uid=1001", starting)
        self.assertEqual(starting[-3:], ["--user", "start", "docker.service"])
        self.assertEqual(fired, [])
        # Type=simple: it answers a moment after systemctl returns.
        self.clock.advance(0.1)
        self.assertEqual(fired, [])
        self.up.add(1001)
        self.clock.advance(0.1)
        self.assertEqual(fired, [None])
        self.assertEqual(self.starter.counts["started"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_readyOfTheCaller(self) -> None:
        """For a chain, the caller says what answering means."""
        fired: list = []
        podman: list[bool] = []
        self.starter.start(ALICE, 30.0, ready=lambda: defer.succeed(bool(podman))).addCallback(fired.append)
        self.startAll()
        self.clock.advance(0.1)
        self.assertEqual(fired, [])
        podman.append(True)
        self.clock.advance(0.1)
        self.assertEqual(fired, [None])

    def test_oneStartInFlightPerUser(self) -> None:
        first, second = self.start(), self.start()
        bob = self.start(BOB)
        self.assertEqual(len(self.runner.pending()), 2)  # one look each for alice and bob
        self.startAll()
        self.clock.advance(0.1)
        self.assertEqual((first, second, bob), ([None], [None], []))
        self.assertEqual(self.starter.counts["started"], 1)
        self.assertEqual(len([a for a, _ in self.runner.calls if a == START_MANAGER]), 1)

    def test_aWaiterWhoLeavesDoesNotStopTheStart(self) -> None:
        leaving = self.starter.start(ALICE, 30.0)
        staying = self.start()
        leaving.cancel()
        self.failureResultOf(leaving, defer.CancelledError)
        self.startAll()
        self.clock.advance(0.1)
        self.assertEqual(staying, [None])

    def test_failureCoolsDown(self) -> None:
        fired = self.start()
        self.upToTheManager()
        self.runner.answer(err=b"Job for user@1001.service failed.\n", code=1)
        [reason] = fired
        self.assertIsInstance(reason, StartFailed)
        self.assertIn("Job for user@1001.service failed.", reason.message)
        # Within the cool-down: the same answer at once, no new command.
        calls = len(self.runner.calls)
        self.clock.advance(59)
        self.assertIs(self.start()[0], reason)
        self.assertEqual(len(self.runner.calls), calls)
        self.assertEqual(self.starter.counts["cooling-down"], 1)
        # After it: a new start.
        self.clock.advance(1)
        self.start()
        self.assertEqual(len(self.runner.calls), calls + 1)
        self.assertEqual(self.starter.counts["failed"], 1)

    def test_coolDownIsPerUser(self) -> None:
        self.start()
        self.runner.answer(code=1)
        self.start(BOB)
        [looking] = self.runner.pending()
        self.assertIn("--uid=1002", looking)

    def test_timeout(self) -> None:
        fired = self.start(timeout=5.0)
        self.upToTheManager()
        self.runner.answer()
        # `systemctl --user start` hangs (a unit that never gets ready).
        [starting] = self.runner.pending()
        self.clock.advance(5.0)
        [reason] = fired
        self.assertIsInstance(reason, StartTimedOut)
        self.assertIn("within 5 seconds", reason.message)
        self.assertEqual(reason.status, 504)
        # The hanging command is cancelled (its child killed).
        self.assertEqual(self.runner.killed, [starting])
        self.assertEqual(self.starter.counts["timeout"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probeThatHangs(self) -> None:
        """
        The probe looks at the user's path off the reactor: while one is
        unanswered no other is asked, and the start's timeout gives it up.
        """
        probes: list[Deferred] = []
        fired: list = []

        def ready() -> Deferred:
            probes.append(Deferred())
            return probes[-1]

        self.starter.start(ALICE, 5.0, ready=ready).addCallback(fired.append)
        self.startAll()
        self.clock.pump([0.1] * 10)
        self.assertEqual(len(probes), 1)
        self.assertEqual(fired, [])
        self.clock.advance(5.0)
        self.assertIsInstance(fired[0], StartTimedOut)
        self.assertTrue(probes[0].called)  # cancelled
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutWhileNothingAnswers(self) -> None:
        fired = self.start(timeout=2.0)
        self.startAll()
        self.up.clear()
        self.clock.pump([0.1] * 25)
        self.assertIsInstance(fired[0], StartTimedOut)

    def test_belowUidMinIsNeverStarted(self) -> None:
        system = Backend("/run/user/999/docker.sock", 999, "daemon")
        root = Backend("/run/user/0/docker.sock", 0, "root")
        self.assertEqual(self.start(system), [None])
        self.assertEqual(self.start(root), [None])
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(self.starter.counts["refused"], 2)
        # Logged once per cool-down, not per connection.
        self.start(root)
        self.assertEqual(self.starter.counts["refused"], 2)

    def test_noHomeIsNeverStarted(self) -> None:
        del self.homes[1001]
        self.assertEqual(self.start(), [None])
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(self.starter.counts["refused"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothingEnabledStartsNoManager(self) -> None:
        """
        Issue 19.1: which units the user enabled is known before their
        manager would be started; with none, nothing is started.
        """
        fired = self.start()
        self.runner.answer(b"")
        [reason] = fired
        self.assertIsInstance(reason, NotEnabled)
        self.assertIn("docker.service or podman.socket", reason.message)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual(self.runner.pending(), [])
        self.assertEqual(self.starter.counts["not-enabled"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_theLookForEnabledUnitsFails(self) -> None:
        fired = self.start()
        self.runner.answer(err=b"Failed to start transient service unit: Access denied\n", code=1)
        [reason] = fired
        self.assertIsInstance(reason, StartFailed)
        self.assertIn("Access denied", reason.message)
        self.assertEqual(len(self.runner.calls), 1)

    def test_startsOnlyWhatIsEnabled(self) -> None:
        self.start()
        self.runner.answer(b"podman.socket\npodman.socket\n")  # the user's link and the admin's
        self.runner.answer(DOWN)
        self.userState(b"")
        self.runner.answer()
        self.assertEqual(self.runner.pending()[0][-3:], ["--user", "start", "podman.socket"])

    def test_aManagerStartedForNothingIsStopped(self) -> None:
        """
        Issue 19.1: a manager this start started, for a unit that then
        failed, is stopped again.
        """
        fired = self.start()
        self.upToTheManager()
        self.runner.answer()
        self.runner.answer(err=b"Job for docker.service failed.\n", code=1)
        self.assertIsInstance(fired[0], StartFailed)
        self.assertEqual(self.runner.answer(b"\n")[:3], ["/usr/bin/loginctl", "show-user", "1001"])
        self.assertEqual(self.runner.answer(), STOP_MANAGER)

    def test_aTimeoutStopsTheManagerItStarted(self) -> None:
        fired = self.start(timeout=5.0)
        self.upToTheManager()
        # `systemctl start user@` hangs (the manager never gets ready).
        [starting] = self.runner.pending()
        self.clock.advance(5.0)
        self.assertIsInstance(fired[0], StartTimedOut)
        self.assertEqual(self.runner.killed, [starting])
        self.runner.answer(b"\n")
        self.assertEqual(self.runner.answer(), STOP_MANAGER)

    def test_aManagerWithASessionMeanwhileIsKept(self) -> None:
        """The user logged in while it started: their session has it now."""
        fired = self.start()
        self.upToTheManager()
        self.runner.answer(code=1)
        self.assertIsInstance(fired[0], StartFailed)
        self.runner.answer(b"7\n")
        self.assertEqual(self.runner.pending(), [])
        self.assertFalse(self.runner.ran(STOP_MANAGER))

    def test_aRunningManagerIsNeitherStartedNorStopped(self) -> None:
        fired = self.start()
        self.runner.answer(ENABLED)
        self.runner.answer(UP)
        self.userState(b"active")
        starting = self.runner.answer(code=1)
        self.assertEqual(starting[-3:], ["--user", "start", "docker.service"])
        self.assertIsInstance(fired[0], StartFailed)
        self.assertFalse(self.runner.ran(START_MANAGER))
        self.assertEqual(self.runner.pending(), [])

    def test_aTeardownInProgressIsWaitedOut(self) -> None:
        """
        Issue 19.1: while the manager or the runtime directory is being
        stopped, nothing is started; once both are gone, a new manager is.
        """
        fired = self.start()
        self.runner.answer(ENABLED)
        self.runner.answer(b"deactivating\n\nactive\n")
        self.assertEqual(self.runner.pending(), [])
        self.clock.advance(0.5)
        self.runner.answer(b"inactive\n\ndeactivating\n")
        self.clock.advance(0.5)
        self.runner.answer(DOWN)
        self.userState(b"")
        self.assertEqual(self.runner.answer(), START_MANAGER)
        self.runner.answer()
        self.up.add(1001)
        self.clock.advance(0.1)
        self.assertEqual(fired, [None])

    def test_aClosingUserIsWaitedOut(self) -> None:
        """
        Issue 19.1: right after the user's last session ended, logind keeps
        their manager for its stop delay, then stops it: wait for that, and
        start a manager of the router's own, rather than a daemon in the old
        one that dies with it.
        """
        fired = self.start()
        self.runner.answer(ENABLED)
        self.runner.answer(UP)
        self.userState(b"closing")
        self.assertEqual(self.runner.pending(), [])
        for _ in range(10):
            self.clock.advance(0.5)
            self.runner.answer(UP)
            self.userState(b"closing")
        # logind stopped the manager and removed the runtime directory, but
        # still has the user for a moment.
        self.clock.advance(0.5)
        self.runner.answer(DOWN)
        self.userState(b"closing")
        self.clock.advance(0.5)
        self.runner.answer(DOWN)
        self.userState(b"")
        self.assertEqual(self.runner.answer(), START_MANAGER)
        self.runner.answer()
        self.up.add(1001)
        self.clock.advance(0.1)
        self.assertEqual(fired, [None])
        self.assertFalse(self.runner.ran(["/usr/bin/systemctl", "stop", "--no-block", "user@1001.service"]))

    def test_closingForGoodStartsInThatManager(self) -> None:
        """
        A closed session that keeps processes keeps the user "closing" and
        the manager running: after a stop delay's wait, start in it.
        """
        fired = self.start(timeout=30.0)
        self.runner.answer(ENABLED)
        while self.clock.seconds() < CLOSING_WAIT:
            self.runner.answer(UP)
            self.userState(b"closing")
            self.clock.advance(0.5)
        self.runner.answer(UP)
        self.userState(b"closing")
        self.assertEqual(self.runner.answer()[-3:], ["--user", "start", "docker.service"])
        self.up.add(1001)
        self.clock.advance(0.1)
        self.assertEqual(fired, [None])
        self.assertFalse(self.runner.ran(START_MANAGER))

    def test_oneLogLinePerStart(self) -> None:
        with capturedLogs() as events:
            self.start()
            self.start()
            self.startAll()
            self.clock.advance(0.1)
        self.assertEqual(len(events), 1)
        self.assertIn("started docker.service of user alice", formatEvent(events[0]))


class EnabledScriptTests(TestCase):
    """The shell that lists the enabled units, run here on real links."""

    def test_listsTheLinksThatResolve(self) -> Deferred:
        from twisted.internet import reactor

        home = os.path.abspath(self.mktemp())
        wants = os.path.join(home, "default.target.wants")
        os.makedirs(wants)
        open(os.path.join(home, "docker.service"), "w").close()
        os.symlink(os.path.join(home, "docker.service"), os.path.join(wants, "docker.service"))
        # A link to a unit file that is gone is no enabled unit.
        os.symlink(os.path.join(home, "gone.socket"), os.path.join(wants, "podman.socket"))
        links = [os.path.join(wants, "docker.service"), os.path.join(wants, "podman.socket"),
                 os.path.join(home, "missing", "podman.socket")]
        d = processRunner(reactor)(["/bin/sh", "-c", starter._ENABLED_SCRIPT, "sh", *links])
        return d.addCallback(self.assertEqual, (b"docker.service\n", b"", 0))


class ProcessRunnerTests(TestCase):
    """The real child processes (the reactor is never blocked on them)."""

    def test_outputAndStatus(self) -> Deferred:
        from twisted.internet import reactor

        d = processRunner(reactor)(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
        return d.addCallback(self.assertEqual, (b"out\n", b"err\n", 3))

    def test_cancelKills(self) -> Deferred:
        """A start that timed out kills its hanging systemctl."""
        from twisted.internet import reactor

        ended: Deferred = Deferred()
        original = starter._Collect.processEnded

        def processEnded(collect: starter._Collect, reason: Failure) -> None:
            original(collect, reason)
            ended.callback(reason.value)

        self.patch(starter._Collect, "processEnded", processEnded)
        d = processRunner(reactor)(["/bin/sleep", "30"])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        return ended.addCallback(lambda ending: self.assertEqual(ending.signal, 9))
