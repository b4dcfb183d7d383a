"""
What the router tells its operator: the one record per finished connection,
the one line per refused one (coalesced under a flood), and how log levels
reach syslog.

Under C{twistd --syslog}, Twisted's syslog observer sends every error as
LOG_ALERT and everything else as LOG_INFO, to the "user" facility, unless an
event carries C{syslogPriority} and C{syslogFacility}; L{RouterLogger} adds
both, so warnings arrive as LOG_WARNING in the daemon facility.
"""

import syslog
import time
from contextlib import contextmanager
from typing import IO, Any, Iterator, Optional
from weakref import WeakSet

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel

SYSLOG_PRIORITIES = {
    LogLevel.debug: syslog.LOG_DEBUG,
    LogLevel.info: syslog.LOG_INFO,
    LogLevel.warn: syslog.LOG_WARNING,
    LogLevel.error: syslog.LOG_ERR,
    LogLevel.critical: syslog.LOG_CRIT,
}

CONNECTION_DONE = (
    "connection done: uid={uid} user={user} pid={pid} backend={backend} "
    "duration={duration:.3f}s to_docker={bytesToDocker} "
    "from_docker={bytesFromDocker} end={end}"
)

# The full sentence goes to the client; the log names the cause and the path.
REJECTED = "rejected uid={uid} user={user} pid={pid} backend={backend} cause={cause}"

REFUSED_MORE = "{count} more connections of uid {uid} ({user}) refused: {cause}"


def emitFormatted(log: Logger, level: LogLevel, format: str, **fields: Any) -> None:
    """
    Emit an event whose text is made here, with C{str.format}, and which
    still carries every field by name.  Twisted's own formatter parses the
    format string anew for every event in pure Python, which for the
    per-connection record costs more than relaying a small request.
    """
    log.emit(level, "{text}", text=format.format(**fields), **fields)


class RouterLogger(Logger):
    """
    A L{Logger} whose events carry their syslog priority and facility.
    """

    def emit(
        self, level: LogLevel, format: Optional[str] = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("syslogPriority", SYSLOG_PRIORITIES[level])
        kwargs.setdefault("syslogFacility", syslog.LOG_DAEMON)
        if "log_trace" in kwargs:
            super().emit(level, format, **kwargs)
            return
        # Logger.emit's event, without its check of the level (the line
        # above has made it), which sorts LogLevel's constants per event.
        kwargs.update(self._own(level, format))
        kwargs["log_time"] = time.time()
        self.observer(kwargs)

    def _own(self, level: LogLevel, format: Optional[str]) -> dict[str, Any]:
        """What Logger.emit adds to an event's fields, but its time."""
        return {
            "log_logger": self,
            "log_level": level,
            "log_namespace": self.namespace,
            "log_source": self.source,
            "log_format": format,
        }

    def emitEach(self, level: LogLevel, format: str, events: list[dict]) -> None:
        """
        Emit each of C{events} (the fields of one event, and its C{log_time})
        as L{emitFormatted} does, doing what is the same for all of them once.
        """
        common = self._own(level, "{text}")
        common["syslogPriority"] = SYSLOG_PRIORITIES[level]
        common["syslogFacility"] = syslog.LOG_DAEMON
        observer = self.observer
        for fields in events:
            fields["text"] = format.format(**fields)
            fields.update(common)
            observer(fields)


class ConnectionRecords:
    """
    The one record of each finished connection, emitted in batches: a
    record waits at most C{interval} seconds, then the batch goes out
    together, each record with the time its connection ended.  Under a
    high connection rate that costs a fraction of emitting each record as
    its connection ends: the logging code stays in the CPU's caches, the
    work that is the same for every record is done once, and a file log
    gets one write for the batch (see L{HeldWrites}).  A reader of the log
    still sees each line within a tenth of a second.
    """

    interval = 0.1

    def __init__(self, reactor: IReactorTime, log: RouterLogger) -> None:
        self._reactor = reactor
        self._log = log
        self._pending: list[dict] = []
        self._timer: Optional[IDelayedCall] = None
        self._stopped = False

    def add(self, **fields: Any) -> None:
        """Keep the record of a connection that has just ended."""
        fields["log_time"] = time.time()
        self._pending.append(fields)
        if self._stopped:
            self.flush()
        elif self._timer is None:
            self._timer = self._reactor.callLater(self.interval, self.flush)

    def stop(self) -> None:
        """
        Emit the records kept so far, and from now on each one as it comes:
        the router is stopping, and its last connections' records must not
        wait for a reactor that may be gone.
        """
        self._stopped = True
        self.flush()

    def flush(self) -> None:
        """Emit every record kept so far."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, []
        if pending:
            with HeldWrites.holding():
                self._log.emitEach(LogLevel.info, CONNECTION_DONE, pending)


class RejectionLog:
    """
    Logs refused connections so that a flood stays readable: the first
    refusal of a uid for a cause is logged in full, the next ones of that
    uid and cause are only counted, and at most one summary line per
    C{interval} says how many there were.  (Metrics count every one.)
    """

    interval = 60.0

    def __init__(self, reactor: IReactorTime, log: Logger) -> None:
        self._reactor = reactor
        self._log = log
        # (uid, cause) -> [refused since the last line, user, time of that line]
        self._held: dict[tuple[int, str], list] = {}
        self._timer: Optional[IDelayedCall] = None

    def rejected(self, uid: int, user: str, pid: int, backend: str, cause: str) -> None:
        held = self._held.get((uid, cause))
        if held is not None:
            held[0] += 1
            return
        self._held[(uid, cause)] = [0, user, self._reactor.seconds()]
        emitFormatted(
            self._log, LogLevel.warn, REJECTED,
            uid=uid, user=user, pid=pid, backend=backend, cause=cause,
        )
        if self._timer is None:
            self._timer = self._reactor.callLater(self.interval, self._summarize)

    def _summarize(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        for (uid, cause), held in list(self._held.items()):
            count, user, since = held
            if count:
                self._summary(uid, user, cause, count)
                held[0], held[2] = 0, now
            elif now - since >= self.interval:
                del self._held[(uid, cause)]
        if self._held:
            self._timer = self._reactor.callLater(self.interval, self._summarize)

    def _summary(self, uid: int, user: str, cause: str, count: int) -> None:
        emitFormatted(
            self._log, LogLevel.warn, REFUSED_MORE,
            uid=uid, user=user, cause=cause, count=count,
        )

    def stop(self) -> None:
        """Say what is still held back (the router is stopping)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for (uid, cause), (count, user, _) in self._held.items():
            if count:
                self._summary(uid, user, cause, count)
        self._held.clear()


class HeldWrites:
    """
    A log file whose writes can be held while a batch of records is
    emitted (L{holding}), then written at once: one system call for the
    batch, not one per line (twistd's file observer flushes every line).
    """

    # Those that exist, so that a batch can hold every one.
    _all: "WeakSet[HeldWrites]" = WeakSet()

    def __init__(self, file: IO[Any]) -> None:
        self._file = file
        self._held: Optional[list] = None
        HeldWrites._all.add(self)

    def write(self, text: Any) -> None:
        if self._held is None:
            self._file.write(text)
        else:
            self._held.append(text)

    def flush(self) -> None:
        if self._held is None:
            self._file.flush()

    def _release(self) -> None:
        held, self._held = self._held, None
        if held:
            self._file.write(held[0][:0].join(held))
            self._file.flush()

    @classmethod
    @contextmanager
    def holding(cls) -> Iterator[None]:
        """While in this block, every L{HeldWrites} keeps what it is given."""
        files = [file for file in cls._all if file._held is None]
        for file in files:
            file._held = []
        try:
            yield
        finally:
            for file in files:
                file._release()
