"""
How much kernel memory the relays may hold for their bulk transfers, per
user and in total.

Bytes in flight sit in the router's pipes and in the send queues of its
sockets: kernel memory charged to the router, which the user can make it
hold for as long as their client doesn't read.  Every direction may hold a
small amount (a small read into the pipe, a small send buffer), which the
connection caps bound; a bulk transfer needs a big pipe and a grown send
buffer, and takes them from this budget first.  A direction that can't have
them stays small: it reads its source only as fast as its sink drains, and
the rest waits in the peer's own socket, charged to the peer.

Grants go back when their direction has been quiet (no byte moved and its
sink's queue drained) for a whole sweep, and when its relay ends.
"""

from typing import Optional, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

MiB = 1 << 20

DEFAULT_PER_USER = 16 * MiB
DEFAULT_TOTAL = 256 * MiB

# How often quiet grants are looked for.
SWEEP_INTERVAL = 1.0


class Holder(Protocol):
    def sweep(self) -> None:
        """Called about once a second: give the grant back if quiet."""


class Budget:
    """
    Bytes lent to directions for their bulk transfers.

    @ivar used: bytes lent in total.
    """

    def __init__(
        self, reactor: IReactorTime, perUser: int = DEFAULT_PER_USER, total: int = DEFAULT_TOTAL
    ) -> None:
        self._reactor = reactor
        self.perUser = perUser
        self.total = total
        self.used = 0
        self._byUser: dict[int, int] = {}
        self._holders: set[Holder] = set()
        self._sweeping: Optional[IDelayedCall] = None

    def heldBy(self, uid: int) -> int:
        """Bytes lent to C{uid}'s directions."""
        return self._byUser.get(uid, 0)

    def take(self, holder: Holder, uid: int, amount: int) -> bool:
        """
        Lend C{amount} to C{holder} (a direction of C{uid}'s) if neither the
        user's share nor the total would go over; say whether it was lent.
        """
        held = self._byUser.get(uid, 0)
        if held + amount > self.perUser or self.used + amount > self.total:
            return False
        self._byUser[uid] = held + amount
        self.used += amount
        self._holders.add(holder)
        if self._sweeping is None:
            self._sweeping = self._reactor.callLater(SWEEP_INTERVAL, self._sweep)
        return True

    def give(self, holder: Holder, uid: int, amount: int) -> None:
        """Take back what C{holder} was lent."""
        self._holders.discard(holder)
        self.used -= amount
        left = self._byUser[uid] - amount
        if left:
            self._byUser[uid] = left
        else:
            del self._byUser[uid]

    def _sweep(self) -> None:
        self._sweeping = None
        for holder in list(self._holders):
            holder.sweep()
        if self._holders:
            self._sweeping = self._reactor.callLater(SWEEP_INTERVAL, self._sweep)

    def stop(self) -> None:
        """Stop sweeping (the factory is stopping)."""
        if self._sweeping is not None and self._sweeping.active():
            self._sweeping.cancel()
        self._sweeping = None
