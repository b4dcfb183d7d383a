"""
The plain settings the relay reads: one L{Settings} per (re)load, which the
factory reads per new connection.  The service builds them from its
configuration; the relay knows nothing of files or options.
"""

from typing import Optional

from attrs import frozen

from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.subordinates import SubordinateIds


@frozen
class Settings:
    """What a new connection is handled with (and the drain's timeout)."""

    resolver: BackendResolver
    connectTimeout: float
    maxConnections: Optional[int] = None
    maxConnectionsPerUser: Optional[int] = None
    shutdownTimeout: float = 10.0
    # Users with per-user metrics series (the most recently active); 0: none.
    usersKept: int = 0
    # The resolver's subordinate uid ranges (re-read on SIGHUP), if routed.
    subordinates: Optional[SubordinateIds] = None
    # How to start a user's daemon that is not there ("systemd"), or None.
    start: Optional[str] = None
    startTimeout: float = 30.0
