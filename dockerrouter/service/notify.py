"""
What the router tells systemd (C{Type=notify}): ready, reloading, stopping,
a status line, and that it is alive (the watchdog).

The protocol (sd_notify(3)) is one datagram of C{NAME=value} lines to the
Unix socket named by C{$NOTIFY_SOCKET}; an C{@} in front names an abstract
socket.  Without C{$NOTIFY_SOCKET} (not under systemd, or C{twistd -n} from a
shell) nothing is sent.
"""

import os
import socket
import time
from typing import Callable, Mapping, Optional, Protocol, Sized

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from dockerrouter.base.logging import RouterLogger

# How often STATUS= is brought up to date (only when it changed).
STATUS_INTERVAL = 5.0


def notifyAddress(environ: Mapping[str, str]) -> Optional[str]:
    """Where C{$NOTIFY_SOCKET} says systemd listens, or C{None}."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    return address if address.startswith(("/", "\0")) else None


class Notifier:
    """
    Sends sd_notify datagrams, or nothing when there is no C{$NOTIFY_SOCKET}.
    """

    log = RouterLogger()

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._address = notifyAddress(environ)
        self._socket: Optional[socket.socket] = None
        if self._address is not None:
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        self._watchdogUsec = 0
        if environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            try:
                self._watchdogUsec = int(environ.get("WATCHDOG_USEC", "0"))
            except ValueError:
                pass

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdogInterval(self) -> Optional[float]:
        """Seconds between watchdog pings (half the timeout), or C{None}."""
        if not self.enabled or self._watchdogUsec <= 0:
            return None
        return self._watchdogUsec / 2e6

    def send(self, **fields: object) -> None:
        """Send C{NAME=value} lines, one per keyword."""
        if self._socket is None or self._address is None:
            return
        data = "".join(f"{name}={value}\n" for name, value in fields.items())
        try:
            self._socket.sendto(data.encode("utf-8"), self._address)
        except OSError as e:
            # A lost status line is harmless; a lost READY=1 shows in systemd.
            self.log.warn("cannot notify systemd at {address}: {error}", address=self._address, error=e)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class _Counts(Protocol):
    """What L{NotifyService} reads of the router's factory for its status."""

    @property
    def relays(self) -> Sized: ...

    def usersActive(self) -> int: ...


class NotifyService(Service):
    """
    Says READY=1 once the reactor runs (every listener accepts by then: the
    listening services listen in C{privilegedStartService}), a STATUS= line
    with the live connections and users every L{STATUS_INTERVAL} seconds when
    it changed, WATCHDOG=1 from the reactor at half the watchdog timeout (a
    wedged reactor then misses it), and STOPPING=1 when the shutdown starts.

    Add it after the listening services: a L{MultiService} stops its
    children last-first, so STOPPING=1 goes out before the drain.
    """

    def __init__(
        self,
        reactor: IReactorTime,  # and IReactorCore: Python has no intersection type
        factory: _Counts,
        notifier: Notifier,
        statusInterval: float = STATUS_INTERVAL,
    ) -> None:
        self._reactor = reactor
        self._factory = factory
        self.notifier = notifier
        self._statusInterval = statusInterval
        self._status: Optional[LoopingCall] = None
        self._lastStatus: Optional[str] = None

    def status(self) -> str:
        return (
            f"{len(self._factory.relays)} connections, "
            f"{self._factory.usersActive()} users"
        )

    def startService(self) -> None:
        super().startService()
        if self.notifier.enabled:
            self._reactor.callWhenRunning(self._ready)  # type: ignore[attr-defined]  # IReactorCore's (see __init__)

    def _ready(self) -> None:
        if not self.running:
            return
        self._lastStatus = self.status()
        self.notifier.ready(self._lastStatus)
        self._status = self._every(self._statusInterval, self._updateStatus)
        interval = self.notifier.watchdogInterval
        if interval is not None:
            # Kept up through the drain, until the reactor stops.
            self._every(interval, lambda: self.notifier.send(WATCHDOG=1))

    def _every(self, interval: float, call: Callable[[], object]) -> LoopingCall:
        loop = LoopingCall(call)
        loop.clock = self._reactor
        loop.start(interval, now=False)
        return loop

    def _updateStatus(self) -> None:
        status = self.status()
        if status != self._lastStatus:
            self._lastStatus = status
            self.notifier.send(STATUS=status)

    def stopService(self) -> None:
        super().stopService()
        if self._status is not None:
            self._status.stop()
            self._status = None
        self.notifier.stopping(f"stopping: draining {self.status()}")
