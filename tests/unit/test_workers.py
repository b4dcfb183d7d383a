"""
The worker threads: bounded per user and in total, results on the reactor
thread, jobs given up while they wait dropped, late results discarded.

Real threads, held by events the test sets; the reactor is a queue of the
calls the threads hand back, which the test runs (with a deadline).
"""

import queue
import threading
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zope.interface import implementer

from dockerrouter.relay.workers import Workers

DEADLINE = 10.0


@implementer(IReactorFromThreads)
class QueueReactor(Clock):
    """A Clock whose C{callFromThread} queues the call for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: "queue.Queue[tuple[Callable[..., Any], tuple]]" = queue.Queue()

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.fromThreads.put((callable, args))

    def runOne(self) -> None:
        """Run the next call a thread handed back (waiting for it)."""
        f, args = self.fromThreads.get(timeout=DEADLINE)
        f(*args)


class Gate:
    """A job that waits until the test opens it; what it was called with."""

    def __init__(self) -> None:
        self.started: "queue.Queue[object]" = queue.Queue()
        self.open = threading.Event()

    def __call__(self, value: object) -> object:
        self.started.put(value)
        if not self.open.wait(DEADLINE):
            raise RuntimeError("the test never opened the gate")
        return value

    def startedNow(self) -> list:
        """The jobs started so far (those that could start have, soon)."""
        seen = []
        while True:
            try:
                seen.append(self.started.get(timeout=0.2))
            except queue.Empty:
                return seen


class WorkersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = QueueReactor()
        self.workers = Workers(self.reactor, threads=3, perUser=2)
        self.gate = Gate()
        # Never leave a thread waiting on the gate.
        self.addCleanup(self.gate.open.set)

    def test_resultOnTheReactorThread(self) -> None:
        fired: list = []
        self.workers.run(1000, lambda a, b: (a + b, threading.current_thread()), 2, 3).addCallback(fired.append)
        self.assertEqual(fired, [])
        self.reactor.runOne()
        [(value, thread)] = fired
        self.assertEqual(value, 5)
        self.assertIsNot(thread, threading.current_thread())
        self.assertTrue(thread.daemon)

    def test_failure(self) -> None:
        failed: list = []
        self.workers.run(1000, lambda: 1 // 0).addErrback(failed.append)
        self.reactor.runOne()
        [failure] = failed
        self.assertTrue(failure.check(ZeroDivisionError))

    def test_atMostPerUser(self) -> None:
        """A user's third job waits for one of their first two, in order."""
        fired: list = []
        for n in range(4):
            self.workers.run(1000, self.gate, n).addCallback(fired.append)
        self.assertEqual(sorted(self.gate.startedNow()), [0, 1])
        self.assertEqual(self.workers.busy(1000), 2)
        self.gate.open.set()
        while len(fired) < 4:
            self.reactor.runOne()
        self.assertEqual(sorted(fired), [0, 1, 2, 3])
        self.assertEqual(self.workers.busy(1000), 0)

    def test_otherUsersGoOn(self) -> None:
        """One user's hung jobs leave the other threads to everyone else."""
        for n in range(5):
            self.workers.run(1000, self.gate, n)
        fired: list = []
        self.workers.run(1001, lambda: "bob").addCallback(fired.append)
        self.reactor.runOne()
        self.assertEqual(fired, ["bob"])

    def test_atMostThreads(self) -> None:
        """Three threads: the fourth user's job waits for one of them."""
        for uid in (1, 2, 3, 4):
            self.workers.run(uid, self.gate, uid)
        self.assertEqual(sorted(self.gate.startedNow()), [1, 2, 3])
        self.gate.open.set()
        self.reactor.runOne()
        self.assertEqual(self.gate.startedNow(), [4])

    def test_cancelledWhileWaiting(self) -> None:
        """A job given up before it started never runs, and frees its turn."""
        ran: list = []
        self.workers.run(1000, self.gate, 0)
        self.workers.run(1000, self.gate, 1)
        waiting = self.workers.run(1000, ran.append, "never")
        waiting.addErrback(lambda f: f.trap(CancelledError))
        self.workers.run(1000, ran.append, "later")
        waiting.cancel()
        self.gate.open.set()
        for _ in range(3):
            self.reactor.runOne()
        self.assertEqual(ran, ["later"])
        self.assertEqual(self.workers.busy(1000), 0)

    def test_timedOutWhileRunningKeepsItsPlace(self) -> None:
        """
        A job past its deadline answers its caller at once, but holds its
        user's place until its thread returns; its late result is discarded.
        """
        discarded: list = []
        failed: list = []
        d = self.workers.run(1000, self.gate, "late", discard=discarded.append)
        d.addTimeout(1, self.reactor).addErrback(failed.append)
        self.workers.run(1000, self.gate, "other")
        self.assertEqual(sorted(self.gate.startedNow()), ["late", "other"])
        self.reactor.advance(1)
        [failure] = failed
        self.assertTrue(failure.check(Exception))
        self.assertEqual(self.workers.busy(1000), 2)
        third = self.workers.run(1000, lambda: "third")
        self.assertEqual(self.gate.startedNow(), [])
        self.gate.open.set()
        fired: list = []
        third.addCallback(fired.append)
        # The late result and the third job's may come back in either order.
        while not (fired and discarded):
            self.reactor.runOne()
        self.assertEqual(discarded, ["late"])

    def test_cancelledReadyJobFreesItsPlace(self) -> None:
        """A job with a place but no thread yet, given up, lets the next in."""
        workers = Workers(self.reactor, threads=1, perUser=2)
        workers.run(1, self.gate, "running")
        ready: Deferred = workers.run(2, lambda: "never")
        ready.addErrback(lambda f: f.trap(CancelledError))
        self.assertEqual(workers.busy(2), 1)
        ready.cancel()
        self.assertEqual(workers.busy(2), 0)
