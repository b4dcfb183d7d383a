"""
SIGHUP: re-read what can be re-read, without touching a live relay.

Each thing that can be reloaded is a callable in the list the service is
given (L{makeService<dockerrouter.service.tap.makeService>} builds it), which does
its re-reading and returns a few words for the log line.  Another concern
(a configuration file) adds its own callable to the list.
"""

import signal
from types import FrameType
from typing import Any, Callable, Optional, Sequence, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads

from dockerrouter.base.logging import RouterLogger
from dockerrouter.service.notify import Notifier

# One thing SIGHUP re-reads: it does so, and says what in a few words (or a
# Deferred of them, for what is re-read off the reactor).
ReloadStep = Callable[[], Union[str, "Deferred[str]"]]


class ReloadService(Service):
    """
    Turns SIGHUP (whose default action would kill the router) into a reload,
    run in the reactor thread: RELOADING=1 to systemd, each reloader in turn,
    one log line, READY=1.
    """

    log = RouterLogger()

    def __init__(self, reactor: IReactorFromThreads, reloaders: Sequence[ReloadStep], notifier: Notifier) -> None:
        self._reactor = reactor
        self.reloaders = list(reloaders)
        self._notifier = notifier
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangUp)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            # Stopping (draining): a late SIGHUP must neither reload nor, by
            # its default action, kill the drain.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._previous = None

    def _hangUp(self, number: int, frame: Optional[FrameType]) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        if not self.running:
            return  # a SIGHUP that came in as the router began to stop
        self._notifier.reloading()

        def failed(failure: Any, reloader: ReloadStep) -> None:
            self.log.failure("reload: {reloader} failed; keeping what it had", failure, reloader=reloader)

        def reloaded(said: list) -> None:
            done = [words for words in said if words is not None]
            self.log.info("reloaded on SIGHUP: {done}", done="; ".join(done) or "nothing to reload")
            self._notifier.send(READY=1)

        # READY=1 once everything is re-read (at once, unless off the reactor).
        gatherResults(
            [maybeDeferred(reloader).addErrback(failed, reloader) for reloader in self.reloaders]
        ).addCallback(reloaded)
