"""
The control endpoint: a read-only JSON view of the live relays, for
C{docker-router status}.

It is root's only: the default socket is mode 0600 in a root-owned
directory, and a Unix client that is not root is refused anyway (its
credentials are read from the socket).  Nothing here changes the router.
A control endpoint that can't be had is a warning, never a failure (see
L{OptionalListener<dockerrouter.service.web.OptionalListener>}): several routers may
run on one host, and only one can have the default path.
"""

import json
import os
import socket
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import ISystemHandle
from twisted.web.resource import Resource
from twisted.web.server import Request

from dockerrouter import __version__
from dockerrouter.routing.credentials import peerCredentials
from dockerrouter.service.web import QuietSite

if TYPE_CHECKING:
    from dockerrouter.relay.factory import RouterFactory


def liveStatus(factory: "RouterFactory") -> dict[str, Any]:
    """
    The live connections per user, and totals.  Bytes so far include open
    streams; C{oldestSeconds} is the age of a user's oldest connection.
    """
    now = factory.reactor.seconds()
    users: dict[int, dict[str, Any]] = {}
    for relay in factory.relays:
        backend = relay.backend
        entry = users.get(backend.uid)
        if entry is None:
            entry = users[backend.uid] = dict(
                user=backend.user, uid=backend.uid, connections=0,
                bytesToDocker=0, bytesFromDocker=0, oldestSeconds=0.0,
            )
        toDocker, fromDocker = relay.bytesMoved()
        entry["connections"] += 1
        entry["bytesToDocker"] += toDocker
        entry["bytesFromDocker"] += fromDocker
        entry["oldestSeconds"] = max(entry["oldestSeconds"], now - relay.startedAt)
    listed = sorted(users.values(), key=lambda u: (-u["connections"], u["uid"]))
    provisioner = getattr(factory.starter, "provisioner", None)
    return dict(
        version=__version__,
        pid=os.getpid(),
        users=listed,
        totals=dict(
            users=len(listed),
            connections=sum(u["connections"] for u in listed),
            bytesToDocker=sum(u["bytesToDocker"] for u in listed),
            bytesFromDocker=sum(u["bytesFromDocker"] for u in listed),
        ),
        # Whom the router set a daemon up for (--provision), and when.
        provisioned=[] if provisioner is None else [
            dict(user=r.get("user"), uid=uid, kind=r.get("kind"), at=r.get("at"))
            for uid, r in sorted(provisioner.records.items())
        ],
    )


def _peerUid(request: Request) -> Optional[int]:
    """The uid of a Unix client, or C{None} for another kind of socket."""
    handle = ISystemHandle(request.channel.transport).getHandle()
    assert isinstance(handle, socket.socket), "served on stream socket endpoints only"
    if handle.family != socket.AF_UNIX:
        return None
    return peerCredentials(handle).uid


class _StatusPage(Resource):
    isLeaf = True

    def __init__(self, factory: "RouterFactory") -> None:
        super().__init__()
        self._factory = factory

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        # Root's only: a client whose uid the kernel can't tell (TCP) is not root.
        if _peerUid(request) != 0:
            request.setResponseCode(403)
            return b'{"message": "docker-router status needs root"}\n'
        return json.dumps(liveStatus(self._factory)).encode("utf-8") + b"\n"


def controlSite(factory: "RouterFactory") -> QuietSite:
    root = Resource()
    root.putChild(b"status", _StatusPage(factory))
    return QuietSite(root)
