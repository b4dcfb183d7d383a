"""
The in-flight budget's accounting: shares per user and in total, and the
sweep that looks for quiet grants.  (The relay's use of it, over real
sockets, is in test_sockets.)
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.relay.budget import SWEEP_INTERVAL, Budget


class Holder:
    """Counts the budget's sweeps; gives its grant back when told to."""

    def __init__(self, budget: Budget, uid: int, amount: int, quietAfter: int = 0) -> None:
        self.budget = budget
        self.uid = uid
        self.amount = amount
        self.sweeps = 0
        self.quietAfter = quietAfter

    def sweep(self) -> None:
        self.sweeps += 1
        if self.quietAfter and self.sweeps >= self.quietAfter:
            self.budget.give(self, self.uid, self.amount)


class BudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.budget = Budget(self.clock, perUser=100, total=250)

    def take(self, uid: int, amount: int) -> bool:
        return self.budget.take(Holder(self.budget, uid, amount), uid, amount)

    def test_perUserShare(self) -> None:
        """
        A user gets grants up to their share and no further; another user
        still gets theirs.
        """
        self.assertEqual([self.take(1, 40) for _ in range(3)], [True, True, False])
        self.assertEqual(self.budget.heldBy(1), 80)
        self.assertTrue(self.take(2, 100))
        self.assertEqual((self.budget.heldBy(2), self.budget.used), (100, 180))

    def test_total(self) -> None:
        """
        Grants stop at the total, whatever each user's share has left.
        """
        self.assertTrue(self.take(1, 100))
        self.assertTrue(self.take(2, 100))
        self.assertFalse(self.take(3, 60))
        self.assertTrue(self.take(3, 50))
        self.assertEqual(self.budget.used, 250)

    def test_giveBack(self) -> None:
        """
        What is given back can be lent again; a user holding nothing has no
        entry left behind.
        """
        holder = Holder(self.budget, 1, 100)
        self.assertTrue(self.budget.take(holder, 1, 100))
        self.assertFalse(self.take(1, 1))
        self.budget.give(holder, 1, 100)
        self.assertEqual((self.budget.heldBy(1), self.budget.used, self.budget._byUser), (0, 0, {}))
        self.assertTrue(self.take(1, 100))

    def test_sweepWhileLent(self) -> None:
        """
        Each holder is swept once per interval while it holds a grant, and
        the sweeping stops when nothing is lent.
        """
        self.assertEqual(self.clock.getDelayedCalls(), [])
        quick = Holder(self.budget, 1, 10, quietAfter=1)
        slow = Holder(self.budget, 2, 10, quietAfter=3)
        self.budget.take(quick, 1, 10)
        self.budget.take(slow, 2, 10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(SWEEP_INTERVAL)
        self.assertEqual((quick.sweeps, slow.sweeps, self.budget.used), (1, 1, 10))
        self.clock.advance(SWEEP_INTERVAL)
        self.clock.advance(SWEEP_INTERVAL)
        self.assertEqual((quick.sweeps, slow.sweeps, self.budget.used), (1, 3, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self) -> None:
        """Stopping cancels the next sweep."""
        self.take(1, 10)
        self.budget.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
