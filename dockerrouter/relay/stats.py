"""
What the relay counts for others to read (metrics, status, notify): the
factory keeps plain counters, and adds each connection's times to
histograms that the service may give it (L{Histogram}).
"""

from typing import Protocol


class Histogram(Protocol):
    """A histogram the factory observes a time in, once per connection."""

    def observe(self, value: float) -> None: ...
