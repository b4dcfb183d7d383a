"""
The refusal log under a flood: the first refusal of a uid for a cause in
full, then at most one summary line per minute.
"""

from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.logging import RejectionLog


class RejectionLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rejections = RejectionLog(self.clock, Logger())

    def refuse(self, times: int, uid: int = 1002, cause: str = "too-many") -> None:
        for _ in range(times):
            self.rejections.rejected(uid, "bob", 77, "/run/user/%d/docker.sock" % uid, cause)

    def texts(self, events: list) -> list[str]:
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
