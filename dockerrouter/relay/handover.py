"""
A live connection as it passes to the next process of the router (a
restart): what its record says so far, in plain values that survive the
trip (L{RelayRecord}, L{recordFromDict}), and its sockets and pipes
(L{HandedRelay}).  How they travel (systemd's file descriptor store) is the
service's business.
"""

from typing import Any

from attrs import asdict, frozen

from dockerrouter.relay.splice import Handed, Progress
from dockerrouter.routing.credentials import Credentials
from dockerrouter.routing.route import Backend


@frozen
class RelayRecord:
    """
    A relay's record so far: who the client is, where it went, when it
    started (the reactor's wall-clock seconds), and how far each direction
    got; the next process goes on from it, so that the one record of the
    connection covers its whole life.
    """

    client: Credentials
    backend: Backend
    startedAt: float
    up: Progress
    down: Progress

    def toDict(self) -> dict[str, Any]:
        """Plain values (for JSON)."""
        return {
            "client": self.client._asdict(),
            "backend": asdict(self.backend),
            "startedAt": self.startedAt,
            "up": asdict(self.up),
            "down": asdict(self.down),
        }


def recordFromDict(values: dict[str, Any]) -> RelayRecord:
    """
    The record L{RelayRecord.toDict} made.

    @raise TypeError, KeyError, ValueError: not such a record.
    """
    return RelayRecord(
        Credentials(**values["client"]),
        Backend(**values["backend"]),
        float(values["startedAt"]),
        Progress(**values["up"]),
        Progress(**values["down"]),
    )


@frozen
class HandedRelay:
    """A relay given up by this process: its record and what it holds."""

    record: RelayRecord
    spliced: Handed
