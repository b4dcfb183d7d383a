"""
sd_notify datagrams (READY, STATUS, WATCHDOG, STOPPING, RELOADING) to a real
datagram socket, driven by a Clock; and SIGHUP as a reload.
"""

import os
import shutil
import signal
import socket
import tempfile
from typing import Callable

from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dockerrouter.service.notify import Notifier, NotifyService
from dockerrouter.service.reload import ReloadService


class _Factory:
    def __init__(self) -> None:
        self.relays: set = set()
        self.users = 0

    def usersActive(self) -> int:
        return self.users


class _RunningClock(Clock):
    """A Clock that runs C{callWhenRunning} calls at once."""

    def callWhenRunning(self, call, *args):
        call(*args)


@implementer(IReactorFromThreads)
class _ThreadQueue:
    """Keeps what C{callFromThread} is given, for the test to run."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(self, callable: Callable[..., object], *args: object, **kwargs: object) -> None:
        self.calls.append(lambda: callable(*args, **kwargs))


class NotifyTestCase(SynchronousTestCase):
    def systemd(self, abstract: bool = False, **environ: str) -> Notifier:
        """A datagram socket playing systemd's, and a notifier aimed at it."""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.listener.close)
        if abstract:
            name = f"dr-notify-test-{os.getpid()}-{id(self)}"
            self.listener.bind("\0" + name)
            address = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="dr-notify-")
            self.addCleanup(shutil.rmtree, directory)
            address = os.path.join(directory, "notify")
            self.listener.bind(address)
        self.listener.setblocking(False)
        notifier = Notifier(dict(environ, NOTIFY_SOCKET=address))
        self.addCleanup(notifier.close)
        return notifier

    def received(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.listener.recv(4096).decode())
            except BlockingIOError:
                return messages


class NotifierTests(NotifyTestCase):
    def test_pathAndAbstract(self) -> None:
        for abstract in (False, True):
            notifier = self.systemd(abstract=abstract)
            notifier.send(READY=1, STATUS="x")
            self.assertEqual(self.received(), ["READY=1\nSTATUS=x\n"])

    def test_noSocketNoNotifying(self) -> None:
        notifier = Notifier({})
        self.assertFalse(notifier.enabled)
        notifier.send(READY=1)  # nothing to send to, and no error

    def test_watchdogOnlyForThisPid(self) -> None:
        self.assertEqual(self.systemd(WATCHDOG_USEC="4000000").watchdogInterval, 2.0)
        mine = self.systemd(WATCHDOG_USEC="4000000", WATCHDOG_PID=str(os.getpid()))
        self.assertEqual(mine.watchdogInterval, 2.0)
        other = self.systemd(WATCHDOG_USEC="4000000", WATCHDOG_PID=str(os.getpid() + 1))
        self.assertIsNone(other.watchdogInterval)
        self.assertIsNone(self.systemd().watchdogInterval)

    def test_reloadingCarriesMonotonicTime(self) -> None:
        notifier = self.systemd()
        notifier.reloading()
        [message] = self.received()
        lines = dict(line.split("=", 1) for line in message.splitlines())
        self.assertEqual(lines["RELOADING"], "1")
        self.assertGreater(int(lines["MONOTONIC_USEC"]), 0)


class NotifyServiceTests(NotifyTestCase):
    def test_life(self) -> None:
        """
        READY=1 with a status when running; STATUS= only when it changed,
        every interval; WATCHDOG=1 at half the watchdog timeout, through the
        drain; STOPPING=1 at stop.
        """
        clock = _RunningClock()
        factory = _Factory()
        service = NotifyService(clock, factory, self.systemd(WATCHDOG_USEC="2000000"), statusInterval=5)
        service.startService()
        self.assertEqual(self.received(), ["READY=1\nSTATUS=0 connections, 0 users\n"])
        clock.advance(1)
        self.assertEqual(self.received(), ["WATCHDOG=1\n"])
        factory.relays.update({1, 2})
        factory.users = 1
        clock.advance(1)
        self.assertEqual(self.received(), ["WATCHDOG=1\n"], "status is not sent per change")
        clock.pump([1, 1, 1])
        self.assertEqual(
            self.received(),
            ["WATCHDOG=1\n", "WATCHDOG=1\n", "STATUS=2 connections, 1 users\n", "WATCHDOG=1\n"],
        )
        clock.advance(5)
        self.assertNotIn("STATUS=2 connections, 1 users\n", self.received(), "unchanged status resent")
        service.stopService()
        self.assertEqual(self.received(), ["STOPPING=1\nSTATUS=stopping: draining 2 connections, 1 users\n"])
        clock.advance(1)
        self.assertEqual(self.received(), ["WATCHDOG=1\n"])


class ReloadTests(NotifyTestCase):
    def test_sighupReloads(self) -> None:
        """
        SIGHUP runs every reloader in the reactor thread, between
        RELOADING=1 and READY=1, and one failing doesn't stop the others.
        """
        queue = _ThreadQueue()
        ran = []

        def broken() -> str:
            raise OSError("gone")

        def works() -> str:
            ran.append(1)
            return "one thing"

        service = ReloadService(queue, [broken, works], self.systemd())
        service.startService()
        self.addCleanup(service.stopService)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(len(queue.calls), 1)
        self.assertEqual(ran, [], "reloaded outside the reactor thread")
        queue.calls[0]()
        self.assertEqual(ran, [1])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        messages = self.received()
        self.assertTrue(messages[0].startswith("RELOADING=1\nMONOTONIC_USEC="), messages)
        self.assertEqual(messages[1:], ["READY=1\n"])

    def test_lateHangUpsAreIgnored(self) -> None:
        """
        Once stopping (a drain may take seconds), SIGHUP is ignored rather
        than left to its default action, which would kill the drain; and a
        reload queued just before the stop does nothing.
        """
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        queue = _ThreadQueue()
        ran: list[int] = []

        def reloader() -> str:
            ran.append(1)
            return "x"

        service = ReloadService(queue, [reloader], self.systemd())
        service.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
        queue.calls[0]()
        self.assertEqual((ran, self.received()), ([], []))
