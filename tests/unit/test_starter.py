"""
The on-demand starter with a Clock and a fake process runner: one start in
flight per user, the cool-down, the users it never starts, the timeout.
"""

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted.python.failure import Failure

from dockerrouter.service import starter
from dockerrouter.routing.route import Backend
from dockerrouter.service.starter import NotEnabled, StartFailed, Starter, StartTimedOut, processRunner

ALICE = Backend("/run/user/1001/docker.sock", 1001, "alice")
BOB = Backend("/run/user/1002/docker.sock", 1002, "bob")
ENABLED = b"docker.service enabled enabled\n"


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

    def startAll(self, uid: int = 1001) -> None:
        """Answer the three commands of a good start; the daemon comes up."""
        self.runner.answer()
        self.runner.answer(ENABLED)
        self.runner.answer()
        self.up.add(uid)

    def test_startsTheUserManagerThenTheEnabledUnits(self) -> None:
        fired = self.start()
        self.assertEqual(self.runner.answer(), ["/usr/bin/systemctl", "start", "user@1001.service"])
        listing = self.runner.answer(ENABLED)
        self.assertIn("--uid=1001", listing)
        self.assertEqual(listing[-6:], ["--user", "list-unit-files", "--state=enabled", "--no-legend",
                                        "docker.service", "podman.socket"])
        starting = self.runner.answer()
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
        self.assertEqual(len(self.runner.pending()), 2)  # one user@ start each for alice and bob
        self.runner.answer()
        self.runner.answer(ENABLED)
        self.runner.answer()
        self.up.add(1001)
        self.clock.advance(0.1)
        self.assertEqual((first, second, bob), ([None], [None], []))
        self.assertEqual(self.starter.counts["started"], 1)
        self.assertEqual(len([a for a, _ in self.runner.calls if "user@1001.service" in a]), 1)

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
        self.assertEqual(self.runner.pending(), [["/usr/bin/systemctl", "start", "user@1002.service"]])

    def test_timeout(self) -> None:
        fired = self.start(timeout=5.0)
        self.runner.answer()
        self.runner.answer(ENABLED)
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
        self.runner.answer()
        self.runner.answer(ENABLED)
        self.runner.answer()
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

    def test_nothingEnabled(self) -> None:
        fired = self.start()
        self.runner.answer()
        self.runner.answer(b"")
        [reason] = fired
        self.assertIsInstance(reason, NotEnabled)
        self.assertIn("docker.service or podman.socket", reason.message)
        self.assertEqual(self.runner.pending(), [])
        self.assertEqual(self.starter.counts["not-enabled"], 1)

    def test_startsOnlyWhatIsEnabled(self) -> None:
        self.start()
        self.runner.answer()
        self.runner.answer(b"podman.socket enabled enabled\n")
        self.assertEqual(self.runner.pending()[0][-3:], ["--user", "start", "podman.socket"])

    def test_oneLogLinePerStart(self) -> None:
        with capturedLogs() as events:
            self.start()
            self.start()
            self.startAll()
            self.clock.advance(0.1)
        self.assertEqual(len(events), 1)
        self.assertIn("started docker.service of user alice", formatEvent(events[0]))


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
