"""
The refusal log under a flood: the first refusal of a uid for a cause in
full, then at most one summary line per minute.  The connection records,
emitted in batches.  The file log's cheaper lines and writes.
"""

import syslog
import time
from typing import Sequence

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dockerrouter.base.logging import (
    CONNECTION_DONE,
    ConnectionRecords,
    HeldWrites,
    RejectionLog,
    RouterLogger,
    emitFormatted,
)
from dockerrouter.service.logfiles import ClassicText, speedUpFileLogs


@implementer(ILogObserver)
class _Recorder(list[LogEvent]):
    """An observer that keeps the events it is given."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


class RejectionLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rejections = RejectionLog(self.clock, Logger())

    def refuse(self, times: int, uid: int = 1002, cause: str = "too-many") -> None:
        for _ in range(times):
            self.rejections.rejected(uid, "bob", 77, "/run/user/%d/docker.sock" % uid, cause)

    def texts(self, events: Sequence[LogEvent]) -> list[str]:
        return [e["text"] for e in events]

    def test_firstInFullThenOneSummaryAMinute(self) -> None:
        with capturedLogs() as events:
            self.refuse(500)
            self.clock.advance(59)
            self.assertEqual(
                self.texts(events),
                ["rejected uid=1002 user=bob pid=77 backend=/run/user/1002/docker.sock cause=too-many"],
            )
            self.clock.advance(1)
            self.refuse(3)
            self.clock.advance(60)
        self.assertEqual(
            self.texts(events)[1:],
            [
                "499 more connections of uid 1002 (bob) refused: too-many",
                "3 more connections of uid 1002 (bob) refused: too-many",
            ],
        )
        self.assertEqual([e["log_level"].name for e in events], ["warn"] * 3)

    def test_eachUidAndCauseOnItsOwn(self) -> None:
        with capturedLogs() as events:
            self.refuse(2, uid=1001)
            self.refuse(2, uid=1002)
            self.refuse(2, uid=1002, cause="missing")
        self.assertEqual([(e["uid"], e["cause"]) for e in events], [(1001, "too-many"), (1002, "too-many"), (1002, "missing")])

    def test_quietAgainAfterAQuietMinute(self) -> None:
        """
        Once a uid has been quiet for a whole minute, its next refusal is
        logged in full again, and no timer is left behind.
        """
        self.refuse(1)
        self.clock.advance(60)
        self.clock.advance(60)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        with capturedLogs() as events:
            self.refuse(1)
        self.assertEqual(len(events), 1)
        self.assertIn("cause=too-many", events[0]["text"])

    def test_stopSaysWhatIsHeldBack(self) -> None:
        self.refuse(4)
        with capturedLogs() as events:
            self.rejections.stop()
        self.assertEqual(self.texts(events), ["3 more connections of uid 1002 (bob) refused: too-many"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClassicTextTests(SynchronousTestCase):
    """
    The cheaper file log lines are Twisted's, character for character, and
    twistd's file observer is found where this code expects it.
    """

    def events(self) -> list[dict]:
        from twisted.python.failure import Failure

        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        made = _Recorder()
        log = RouterLogger(namespace="dockerrouter.relay.protocol.ServerProtocol", observer=made)
        emitFormatted(log, LogLevel.info, CONNECTION_DONE, uid=1001, user="alice", pid=4711,
                      backend="/run/user/1001/docker.sock", duration=0.25, bytesToDocker=183,
                      bytesFromDocker=2211, end="closed")
        log.warn("two\nlines {n}", n=2)
        log.failure("it broke", failure)
        emitFormatted(log, LogLevel.warn, "{extra} and more", extra=1)
        made.append(dict(log_format="{text}", text="legacy", log_system="-", log_time=made[0]["log_time"] + 0.5))
        made.append(dict(log_format="{text}", text="", log_time=made[0]["log_time"] + 1.0))
        return made

    def test_sameLines(self) -> None:
        from twisted.logger import formatEventAsClassicLogText

        classic = ClassicText()
        for event in self.events():
            self.assertEqual(classic(event), formatEventAsClassicLogText(event), event)

    def test_findsTwistdsFileObserver(self) -> None:
        import io

        from twisted.logger import LogPublisher, textFileLogObserver

        out = io.StringIO()
        fileObserver = textFileLogObserver(out)
        other = textFileLogObserver(io.StringIO(), timeFormat=None)
        other.formatEvent = lambda event: "mine\n"
        publisher = LogPublisher(fileObserver, other, _Recorder())
        self.assertEqual(speedUpFileLogs(publisher), 1)
        self.assertIsInstance(fileObserver.formatEvent, ClassicText)
        emitFormatted(RouterLogger(observer=publisher), LogLevel.info, "x={x}", x=1)
        self.assertTrue(out.getvalue().endswith("#info] x=1\n"), out.getvalue())


class _Writes(list[str]):
    """A file that keeps each write, and counts its flushes."""

    flushes = 0

    def write(self, text: str) -> None:
        self.append(text)

    def flush(self) -> None:
        self.flushes += 1


def _record(n: int) -> dict:
    return dict(
        uid=1001, user="alice", pid=n, backend="/run/user/1001/docker.sock", duration=0.5,
        bytesToDocker=n, bytesFromDocker=2 * n, end="closed",
    )


class ConnectionRecordsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = _Recorder()
        self.records = ConnectionRecords(self.clock, RouterLogger("dockerrouter.relay.protocol.ServerProtocol", observer=self.events))

    def test_batchWithinAnInterval(self) -> None:
        """
        Records wait for at most one interval, then go out together, in
        order, each with the time its connection ended; then no timer is
        left.
        """
        before = time.time()
        self.records.add(**_record(1))
        self.clock.advance(ConnectionRecords.interval / 2)
        self.records.add(**_record(2))
        self.assertEqual(self.events, [])
        self.clock.advance(ConnectionRecords.interval / 2)
        self.assertEqual([e["pid"] for e in self.events], [1, 2])
        self.assertLessEqual(before, self.events[0]["log_time"])
        self.assertLessEqual(self.events[0]["log_time"], self.events[1]["log_time"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sameEventsAsEmitFormatted(self) -> None:
        """A record in a batch is the event L{emitFormatted} makes."""
        self.records.add(**_record(7))
        self.records.flush()
        one = _Recorder()
        emitFormatted(RouterLogger("dockerrouter.relay.protocol.ServerProtocol", observer=one), LogLevel.info, CONNECTION_DONE, **_record(7))
        [batched], [single] = self.events, one
        self.assertLess(abs(batched.pop("log_time") - single.pop("log_time")), 1)
        self.assertEqual(batched.pop("log_logger").namespace, single.pop("log_logger").namespace)
        self.assertEqual(batched, single)
        self.assertTrue(batched["text"].startswith("connection done: uid=1001 user=alice pid=7 "))

    def test_stopEmitsAndThenEachAtOnce(self) -> None:
        self.records.add(**_record(1))
        self.records.stop()
        self.assertEqual([e["pid"] for e in self.events], [1])
        self.records.add(**_record(2))
        self.assertEqual([e["pid"] for e in self.events], [1, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oneWritePerBatch(self) -> None:
        """
        A file log gets a batch in one write; lines outside a batch are
        written, and flushed, one by one as before.
        """
        from twisted.logger import LogPublisher, textFileLogObserver

        out = _Writes()
        publisher = LogPublisher(textFileLogObserver(out))  # type: ignore[arg-type]  # a file enough for it
        self.assertEqual(speedUpFileLogs(publisher), 1)
        self.records = ConnectionRecords(self.clock, RouterLogger(observer=publisher))
        for n in range(3):
            self.records.add(**_record(n))
        self.clock.advance(ConnectionRecords.interval)
        [batch] = out
        self.assertEqual([line.split(" pid=")[1][0] for line in batch.splitlines()], ["0", "1", "2"])
        self.assertEqual(out.flushes, 1)
        RouterLogger(observer=publisher).info("alone")
        self.assertTrue(out[1].endswith("alone\n"))
        self.assertEqual(out.flushes, 2)

    def test_heldWritesOfBytes(self) -> None:
        """A file of bytes gets its batch joined as bytes."""
        out = _Writes()
        held = HeldWrites(out)  # type: ignore[arg-type]  # a file enough for it
        with HeldWrites.holding():
            held.write(b"a\n")
            held.write(b"b\n")
            held.flush()
            self.assertEqual(out, [])
        self.assertEqual(out, [b"a\nb\n"])


class RouterLoggerTests(SynchronousTestCase):
    def test_sameEventsAsLoggers(self) -> None:
        """
        L{RouterLogger} makes the events L{Logger.emit} makes (less its
        check of the level), with the syslog priority and facility added.
        """
        events = _Recorder()
        source = object()
        for kind in (Logger, RouterLogger):
            kind("a.namespace", source, events).emit(LogLevel.warn, "{x}", x=1)
        twisted, ours = events
        self.assertEqual(ours.pop("syslogPriority"), syslog.LOG_WARNING)
        self.assertEqual(ours.pop("syslogFacility"), syslog.LOG_DAEMON)
        self.assertLess(ours.pop("log_time") - twisted.pop("log_time"), 1)
        self.assertIs(ours.pop("log_logger").__class__, RouterLogger)
        twisted.pop("log_logger")
        self.assertEqual(ours, twisted)
