"""
Restarts nobody notices: live connections pass from one process of the
router to the next through systemd's file descriptor store.

Under systemd with a store (C{FileDescriptorStoreMax=}, which systemd 254
and later announce as C{$FDSTORE}; the unit sets it for older ones), a stop
hands every live connection over instead of draining: the relays stop where
they are, and each one's two sockets, and any pipe still holding its bytes,
go to the store with C{FDSTORE=1} and a name (C{relay.PID.N.client},
C{relay.PID.N.docker}, C{relay.PID.N.up.read}, ...; PID, the handing
process's, keeps every name unique even if some removal was lost); a client
still waiting to be routed goes as C{client.PID.N}; the records so far go in
a memfd named C{state.PID}.  A barrier makes sure systemd has them all, and the process exits
at once.  The next process finds them in C{LISTEN_FDS}/C{LISTEN_FDNAMES}
(L{HandOverService.startService}), resumes each relay from where it
stopped, routes each waiting client afresh, and removes what it took from
the store (C{FDSTOREREMOVE=1}), so that a relay that ends is never handed
again.

A listening socket the router binds itself (the plain unit) is stored too,
as C{listen PATH}, as soon as it listens: the next process (after a
restart, or a crash) adopts it, so clients wait in its backlog instead of
being refused, and the path is never unlinked nor bound anew.  (A socket
unit's listener is systemd's already.)

Without a store (C{twistd -n}, no C{$NOTIFY_SOCKET}), a stop drains as
before.
"""

import array
import json
import os
import select
import socket
import time
from typing import Any, Mapping, Optional

from twisted.application.service import Service

from dockerrouter.base._compat import forgetExitSignal
from dockerrouter.base.logging import RouterLogger
from dockerrouter.relay.factory import RouterFactory
from dockerrouter.relay.handover import HandedRelay, recordFromDict
from dockerrouter.relay.splice import Pipe, adoptedPipe
from dockerrouter.routing.reasons import BackendUnusable
from dockerrouter.service.notify import notifyAddress

# The memfd with the handed relays' records: this, then the pid.
STATE = "state."
# A listening socket's name in the store: this, then its path.
LISTEN = "listen "
# How long a hand-over waits for systemd to have taken everything.
BARRIER_TIMEOUT = 5.0


def listenName(path: str) -> str:
    return LISTEN + path


class FdStore:
    """
    systemd's file descriptor store, reached over the notify socket
    (sd_pid_notify_with_fds(3)).

    Its datagrams go through a socket of its own, connected and blocking
    (for at most a few seconds): unlike a status line, a descriptor that
    doesn't reach the store is a connection cut.  It is used when the
    router starts and when it stops, never while it serves.

    @ivar limit: how many descriptors the store holds (C{$FDSTORE}), 0 for
        none.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ, timeout: float = BARRIER_TIMEOUT) -> None:
        self._address = notifyAddress(environ)
        self._timeout = timeout
        self._socket: Optional[socket.socket] = None
        try:
            self.limit = max(0, int(environ.get("FDSTORE", "0")))
        except ValueError:
            self.limit = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None and self.limit > 0

    def _send(self, text: str, fds: list[int]) -> None:
        if self._address is None:
            return
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.settimeout(self._timeout)
            self._socket.connect(self._address)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self._socket.sendmsg([text.encode("ascii")], rights)

    def store(self, name: str, fd: int, poll: bool = True) -> None:
        """
        Have systemd keep C{fd} as C{name} (no C{:}, printable ASCII).

        @param poll: whether systemd may drop it when it hangs up; not for a
            relay's socket, whose peer may have closed while its last bytes
            are still to be passed on.
        """
        self._send(f"FDSTORE=1\nFDNAME={name}\n" + ("" if poll else "FDPOLL=0\n"), [fd])

    def remove(self, name: str) -> None:
        """Have systemd close what it keeps as C{name}."""
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}\n", [])

    def barrier(self) -> bool:
        """
        Wait until systemd has handled every datagram sent so far (it
        closes the pipe sent along); say whether it did in time.
        """
        if self._address is None:
            return True
        readEnd, writeEnd = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self._send("BARRIER=1\n", [writeEnd])
            finally:
                os.close(writeEnd)
            ready, _, _ = select.select([readEnd], [], [], self._timeout)
            return bool(ready)
        finally:
            os.close(readEnd)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _taken(fd: int) -> int:
    """A descriptor systemd passed: not for children (the starter's)."""
    os.set_inheritable(fd, False)
    return fd


class HandOverService(Service):
    """
    At start, resumes what the last process handed over; at stop, with a
    store, hands every connection to it and lets the process exit (see the
    module's docstring).

    @param inherited: the descriptors systemd passed, by name; this takes
        the relays', the waiting clients' and the states (the listeners are
        the listening services').
    @param listeners: how many of the store's places the listening sockets
        hold.
    """

    log = RouterLogger()

    def __init__(self, factory: RouterFactory, store: FdStore, inherited: dict[str, int], listeners: int = 0) -> None:
        self.factory = factory
        self.store = store
        self._inherited = inherited
        self._listeners = listeners

    def startService(self) -> None:
        super().startService()
        names = [name for name in self._inherited if name.startswith((STATE, "relay.", "client."))]
        taken = {name: _taken(self._inherited.pop(name)) for name in names}
        if taken:
            self._pickUp(taken)
            try:
                for name in names:
                    self.store.remove(name)
            except OSError as e:
                # Handed again, they are found older than the next
                # hand-over's, and closed.
                self.log.warn("cannot remove what it took from systemd's store: {error}", error=e)

    def _pickUp(self, taken: dict[str, int]) -> None:
        """
        Resume the relays of the last hand-over in C{taken}, route its
        waiting clients, and close the rest (what an earlier hand-over left,
        had a removal been lost: the same connections, older).
        """
        relays = 0
        latest: dict[str, Any] = {"handedAt": -1.0, "pid": None, "relays": []}
        for name in [name for name in taken if name.startswith(STATE)]:
            with os.fdopen(taken.pop(name), "rb") as f:
                f.seek(0)
                try:
                    state = json.load(f)
                    if float(state["handedAt"]) > latest["handedAt"]:
                        latest = state
                except (ValueError, KeyError, TypeError) as e:
                    self.log.error("the last process's state is unreadable ({error}): its relays are cut", error=e)
        entries = latest["relays"]
        for entry in entries:
            try:
                prefix = str(entry["prefix"])
                record = recordFromDict(entry["record"])
                fds = {part: taken.pop(prefix + part) for part in entry["parts"]}
            except (KeyError, TypeError, ValueError) as e:
                self.log.error("a relay the last process handed over is cut: {error!r}", error=e)
                continue
            client = socket.socket(fileno=fds["client"])
            daemon = socket.socket(fileno=fds["docker"])
            pipes = tuple(self._pipe(fds, way) for way in ("up", "down"))
            try:
                self.factory.resume(record, client, daemon, (pipes[0], pipes[1]))
            except (BackendUnusable, ValueError, OSError) as e:
                self.log.error(
                    "a relay of uid {uid} the last process handed over is cut: {error}", uid=record.client.uid, error=e
                )
                client.close()
                daemon.close()
                for pipe in pipes:
                    if pipe is not None:
                        os.close(pipe[0])
                        os.close(pipe[1])
                continue
            relays += 1
        waiting = 0
        for name in sorted(taken):
            fd = taken.pop(name)
            if name.startswith(f"client.{latest['pid']}."):
                self.factory.adopt(socket.socket(fileno=fd))
                waiting += 1
            else:
                os.close(fd)  # a part of no relay (its record is lost)
        self.log.info(
            "resumed {relays} connections and {waiting} waiting clients from the last process",
            relays=relays,
            waiting=waiting,
        )

    @staticmethod
    def _pipe(fds: dict[str, int], way: str) -> Optional[Pipe]:
        if way + ".read" not in fds:
            return None
        return adoptedPipe(fds[way + ".read"], fds[way + ".write"])

    def stopService(self) -> None:
        super().stopService()
        if not self.store.enabled:
            return  # drained instead
        relays, waiting = self.factory.handOver()
        try:
            self._store(relays, waiting)
        except OSError as e:
            self.log.error(
                "cannot hand {relays} connections over to systemd ({error}): they are cut",
                relays=len(relays),
                error=e,
            )
        self.store.close()
        # The stop SIGTERM asked for is done: exit 0, not 143.
        forgetExitSignal(self.factory.reactor)

    def _store(self, relays: list[HandedRelay], waiting: list[socket.socket]) -> None:
        room = self.store.limit - self._listeners - 1  # and the state
        pid = os.getpid()
        entries = []
        cut = 0
        for n, handed in enumerate(relays):
            parts = self._parts(handed)
            if len(parts) > room:
                cut += 1
                continue
            room -= len(parts)
            for part, fd in parts.items():
                self.store.store(f"relay.{pid}.{n}.{part}", fd, poll=False)
            entries.append({"prefix": f"relay.{pid}.{n}.", "parts": sorted(parts), "record": handed.record.toDict()})
        stored = 0
        for n, client in enumerate(waiting):
            if stored < room:
                stored += 1
                self.store.store(f"client.{pid}.{n}", client.fileno(), poll=False)
        cut += len(waiting) - stored
        with os.fdopen(os.memfd_create(f"{STATE}{pid}", os.MFD_CLOEXEC), "wb") as state:
            state.write(json.dumps({"handedAt": time.time(), "pid": pid, "relays": entries}).encode())
            state.flush()
            self.store.store(f"{STATE}{pid}", state.fileno())
        confirmed = self.store.barrier()
        self.log.info(
            "handed {relays} connections and {waiting} waiting clients to the next process"
            + ("" if confirmed else " (systemd did not confirm it has them)")
            + (", cut {cut}: the store is full" if cut else ""),
            relays=len(entries),
            waiting=stored,
            cut=cut,
        )

    @staticmethod
    def _parts(handed: HandedRelay) -> dict[str, int]:
        spliced = handed.spliced
        parts = {"client": spliced.client.fileno(), "docker": spliced.daemon.fileno()}
        for way, pipe in (("up", spliced.upPipe), ("down", spliced.downPipe)):
            if pipe is not None:
                parts[way + ".read"], parts[way + ".write"] = pipe
        return parts
