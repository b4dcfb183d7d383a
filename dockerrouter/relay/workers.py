"""
Threads for the work the reactor must never wait on: a look at a path a
user chose (an open, a C{stat}, a connect, the visibility walk) and the
user database, either of which can hang for as long as a FUSE mount, an
NFS server or an LDAP server likes.

L{Workers} runs such a job in a thread, at most C{perUser} at once for one
uid (the others of that uid wait their turn, in order), so that one user's
hung paths hold a few threads and never all of them.  The caller puts the
deadline on the Deferred (C{addTimeout}); a job given up while it waits is
dropped, one given up while it runs keeps its user's place until its
thread returns: that is the bound doing its job.
"""

import queue
import threading
from collections import deque
from typing import Any, Callable, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

# Threads in all: enough that the users whose paths hang (each holding at
# most PER_USER) leave room for everyone else.
THREADS = 32
# Jobs of one user running at once.
PER_USER = 2


class RunsJobs(Protocol):
    """What runs a job for a user off the reactor thread (L{Workers})."""

    def run(
        self, uid: int, function: Callable[..., Any], *args: Any, discard: Optional[Callable[[Any], None]] = None
    ) -> Deferred: ...


class _Job:
    """One call to make in a thread, and the Deferred its caller holds."""

    def __init__(
        self,
        uid: int,
        function: Callable[..., Any],
        args: tuple,
        discard: Optional[Callable[[Any], None]],
        cancel: Callable[["_Job"], None],
    ) -> None:
        self.uid = uid
        self.function = function
        self.args = args
        self.discard = discard
        self.deferred: Deferred = Deferred(lambda _: cancel(self))


class Workers:
    """
    A pool of daemon threads, bounded per uid and in total, whose results
    come back on the reactor thread.

    Hand-written rather than Twisted's C{ThreadPool} or
    C{concurrent.futures}: both join their threads when they stop, and a
    thread stuck for good in a FUSE lookup would then hang the router's
    shutdown.  These threads are daemon threads, left behind at exit.
    """

    def __init__(self, reactor: IReactorFromThreads, threads: int = THREADS, perUser: int = PER_USER) -> None:
        self._reactor = reactor
        self._most = threads
        self._perUser = perUser
        # uid -> jobs that wait for one of that user's places, in order.
        self._waiting: dict[int, deque[_Job]] = {}
        # uid -> places taken: jobs ready to run or running.
        self._taken: dict[int, int] = {}
        # Jobs with a place of their user's, waiting for a thread, in order.
        self._ready: deque[_Job] = deque()
        self._threads = 0
        self._idle = 0
        # Handed to idle threads only: never holds more jobs than they.
        self._handOver: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()

    def run(
        self,
        uid: int,
        function: Callable[..., Any],
        *args: Any,
        discard: Optional[Callable[[Any], None]] = None,
    ) -> Deferred:
        """
        C{function(*args)} in a thread, as one of C{uid}'s jobs.

        @param discard: given a result that came after the Deferred was
            cancelled or timed out (to close what it holds).
        @return: fires with the result or failure on the reactor thread;
            cancelling it drops a job that has not started.
        """
        job = _Job(uid, function, args, discard, self._cancel)
        if self._taken.get(uid, 0) < self._perUser:
            self._take(job)
        else:
            self._waiting.setdefault(uid, deque()).append(job)
        self._dispatch()
        return job.deferred

    def busy(self, uid: int) -> int:
        """How many places C{uid}'s jobs hold (ready or running)."""
        return self._taken.get(uid, 0)

    def _take(self, job: _Job) -> None:
        self._taken[job.uid] = self._taken.get(job.uid, 0) + 1
        self._ready.append(job)

    def _give(self, uid: int) -> None:
        """A place of C{uid}'s is free: the next job of theirs takes it."""
        self._taken[uid] -= 1
        if not self._taken[uid]:
            del self._taken[uid]
        waiting = self._waiting.get(uid)
        if waiting:
            self._take(waiting.popleft())
            if not waiting:
                del self._waiting[uid]

    def _cancel(self, job: _Job) -> None:
        waiting = self._waiting.get(job.uid)
        if waiting is not None and job in waiting:
            waiting.remove(job)
            if not waiting:
                del self._waiting[job.uid]
        elif job in self._ready:
            self._ready.remove(job)
            self._give(job.uid)
            self._dispatch()
        # Running: it keeps its place until its thread returns.

    def _dispatch(self) -> None:
        while self._ready:
            if not self._idle:
                if self._threads >= self._most:
                    return
                self._threads += 1
                self._idle += 1
                threading.Thread(target=self._work, name="docker-router worker", daemon=True).start()
            self._idle -= 1
            self._handOver.put(self._ready.popleft())

    def _work(self) -> None:
        while True:
            job = self._handOver.get()
            try:
                result: Any = job.function(*job.args)
                ok = True
            except BaseException:
                result, ok = Failure(), False
            self._reactor.callFromThread(self._done, job, ok, result)
            del job, result

    def _done(self, job: _Job, ok: bool, result: Any) -> None:
        self._idle += 1
        self._give(job.uid)
        self._dispatch()
        if job.deferred.called:
            if ok and job.discard is not None:
                job.discard(result)
            return
        if ok:
            job.deferred.callback(result)
        else:
            job.deferred.errback(result)
