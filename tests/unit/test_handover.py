"""
Handing a relay to the next process: a splice stopped with bytes in its
pipe and resumed elsewhere loses, repeats and reorders nothing (over real
sockets and the real reactor); a record survives its trip as JSON; the file
descriptor store's datagrams, with their descriptors, as systemd reads
them.
"""

import array
import json
import os
import shutil
import socket
import tempfile
import threading
from typing import Optional

from twisted.internet import reactor, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dockerrouter.relay.budget import Budget
from dockerrouter.relay.factory import RouterFactory
from dockerrouter.relay.settings import Settings
from dockerrouter.relay.handover import RelayRecord, recordFromDict
from dockerrouter.relay.splice import PipePool, Progress, Splicer, adoptedPipe
from dockerrouter.routing.credentials import Credentials
from dockerrouter.routing.reasons import RouterLoop, WrongOwner
from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.route import Backend
from dockerrouter.service.handover import FdStore
from tests.unit.test_sockets import pollUntil


def _readAll(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        more = sock.recv(65536)
        if not more:
            return bytes(data)
        data += more


class SpliceHandOverTests(TestCase):
    def setUp(self) -> None:
        self.clientRouter, self.client = socket.socketpair()
        self.daemonRouter, self.daemon = socket.socketpair()
        for sock in (self.clientRouter, self.client, self.daemonRouter, self.daemon):
            self.addCleanup(sock.close)
        for sock in (self.clientRouter, self.daemonRouter):
            sock.setblocking(False)
        self.ended: list[Optional[str]] = []
        self.budget = Budget(reactor)
        self.addCleanup(self.budget.stop)

    def splicer(self, client: socket.socket, daemon: socket.socket) -> Splicer:
        def ended(failure: Optional[str]) -> None:
            self.ended.append(failure)
            splicer.close()  # as its protocol does: the peers see their ends

        splicer = Splicer(reactor, PipePool(), client, daemon, ended, self.budget, 1000)
        self.addCleanup(splicer.stop)
        return splicer

    async def test_bytesInThePipeGoOn(self) -> None:
        """
        A direction stalled with bytes in its pipe (the client doesn't
        read) is handed over with the pipe; the next splicer passes those
        bytes on first, then the rest, and counts every byte of both.
        """
        data = os.urandom(3 << 20)

        def send() -> None:
            self.daemon.sendall(data)
            self.daemon.shutdown(socket.SHUT_WR)

        sending = threads.deferToThread(send)
        first = self.splicer(self.clientRouter, self.daemonRouter)
        first.start()
        await pollUntil(lambda: first._down.pending > 0 and not first._down.source.reading)
        handed = first.handOver()
        self.assertIsNotNone(handed.downPipe)
        self.assertIsNone(handed.upPipe)
        self.assertEqual(handed.down.eof, False)
        taken = handed.down.count
        self.assertGreater(taken, 0)

        second = self.splicer(handed.client, handed.daemon)
        assert handed.downPipe is not None
        second.resume(handed.up, handed.down, upPipe=None, downPipe=adoptedPipe(*handed.downPipe))
        received = await threads.deferToThread(_readAll, self.client)
        await sending
        self.assertEqual(len(received), len(data))
        self.assertTrue(received == data, "the bytes differ")
        self.assertEqual(second.fromDocker, len(data))
        self.assertEqual(self.ended, [])
        self.client.shutdown(socket.SHUT_WR)
        await pollUntil(lambda: self.ended == [None])
        self.assertEqual(await threads.deferToThread(_readAll, self.daemon), b"")

    async def test_anEndedDirectionStaysEnded(self) -> None:
        """
        A direction whose end was passed on is not read again in the next
        process; the other goes on, and its end ends the relay.
        """
        self.client.sendall(b"request")
        self.client.shutdown(socket.SHUT_WR)
        first = self.splicer(self.clientRouter, self.daemonRouter)
        first.start()
        self.assertEqual(self.daemon.recv(100), b"request")
        await pollUntil(lambda: first._up.done)
        handed = first.handOver()
        self.assertEqual(handed.up, Progress(7, True, True, False))
        second = self.splicer(handed.client, handed.daemon)
        second.resume(handed.up, handed.down, None, None)
        self.assertFalse(second._client.reading)
        self.daemon.sendall(b"answer")
        self.daemon.shutdown(socket.SHUT_WR)
        self.assertEqual(await threads.deferToThread(_readAll, self.client), b"answer")
        await pollUntil(lambda: self.ended == [None])
        self.assertEqual((second.toDocker, second.fromDocker), (7, 6))


class RecordTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """A record comes back from its JSON as it was."""
        record = RelayRecord(
            Credentials(1234, 1000, 1000),
            Backend("/run/user/1000/docker.sock", 1000, "alice", template="/run/user/{uid}/docker.sock"),
            1700000000.25,
            Progress(10, True, True, False),
            Progress(1 << 40, False, False, True),
        )
        self.assertEqual(recordFromDict(json.loads(json.dumps(record.toDict()))), record)

    def test_notARecord(self) -> None:
        with self.assertRaises((KeyError, TypeError, ValueError)):
            recordFromDict({"client": {"pid": 1}})


class FdStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="dr-fdstore-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "notify")
        self.systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.systemd.close)
        self.systemd.bind(self.path)
        self.store = FdStore({"NOTIFY_SOCKET": self.path, "FDSTORE": "10"}, timeout=0.2)
        self.addCleanup(self.store.close)

    def receive(self) -> tuple[list[str], list[int]]:
        data, ancillary, _, _ = self.systemd.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for _, _, payload in ancillary:
            fds.frombytes(payload)
        for fd in fds:
            self.addCleanup(os.close, fd)
        return data.decode().splitlines(), list(fds)

    def test_enabled(self) -> None:
        """Only with a notify socket and a store to hold descriptors."""
        self.assertTrue(self.store.enabled)
        self.assertEqual(self.store.limit, 10)
        self.assertFalse(FdStore({"NOTIFY_SOCKET": self.path}).enabled)
        self.assertFalse(FdStore({"NOTIFY_SOCKET": self.path, "FDSTORE": "0"}).enabled)
        self.assertFalse(FdStore({"FDSTORE": "10"}).enabled)
        self.assertFalse(FdStore({"NOTIFY_SOCKET": self.path, "FDSTORE": "x"}).enabled)

    def test_store(self) -> None:
        """One descriptor a datagram, with its name, not polled if asked."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.store.store("relay.3.client", a.fileno(), poll=False)
        self.store.store("listen /run/docker.sock", b.fileno())
        lines, fds = self.receive()
        self.assertEqual(lines, ["FDSTORE=1", "FDNAME=relay.3.client", "FDPOLL=0"])
        self.assertEqual(os.fstat(fds[0]).st_ino, os.fstat(a.fileno()).st_ino)
        lines, fds = self.receive()
        self.assertEqual(lines, ["FDSTORE=1", "FDNAME=listen /run/docker.sock"])
        self.assertEqual(os.fstat(fds[0]).st_ino, os.fstat(b.fileno()).st_ino)

    def test_remove(self) -> None:
        self.store.remove("relay.3.client")
        self.assertEqual(self.receive(), (["FDSTOREREMOVE=1", "FDNAME=relay.3.client"], []))

    def test_barrierUnanswered(self) -> None:
        """Not done when systemd doesn't close the descriptor in time."""
        self.assertFalse(self.store.barrier())
        self.assertEqual(self.receive()[0], ["BARRIER=1"])

    def test_barrierAnswered(self) -> None:
        """Done when systemd closes the descriptor sent along."""

        def systemd() -> None:
            _, fds, _, _ = self.systemd.recvmsg(4096, socket.CMSG_SPACE(4))
            for _, _, payload in fds:
                os.close(array.array("i", payload)[0])

        answering = threading.Thread(target=systemd)
        answering.start()
        self.addCleanup(answering.join)
        self.assertTrue(self.store.barrier())


class ResumeCheckTests(SynchronousTestCase):
    """
    A relay handed over is checked again before it is resumed: the daemon
    must be one the client may reach, the client the one recorded.
    """

    def setUp(self) -> None:
        self.factory = RouterFactory(MemoryReactorClock(), Settings(BackendResolver("/nonexistent/{uid}.sock"), 5))
        self.addCleanup(self.factory.budget.stop)
        self.client, self.clientPeer = socket.socketpair()
        self.daemon, self.daemonPeer = socket.socketpair()
        for sock in (self.client, self.clientPeer, self.daemon, self.daemonPeer):
            self.addCleanup(sock.close)
        me = Credentials(os.getpid(), os.getuid(), os.getgid())
        self.record = RelayRecord(me, Backend("/run/user/0/docker.sock", os.getuid(), "root"), 0.0, Progress(), Progress())

    def test_resumed(self) -> None:
        self.factory.routerPid = lambda: -1
        self.factory.resume(self.record, self.client, self.daemon, (None, None))
        self.assertEqual((len(self.factory.relays), self.factory.userConnections(os.getuid())), (1, 1))
        for relay in list(self.factory.relays):
            relay.abort("test")

    def test_aDaemonOfAnotherOwner(self) -> None:
        record = RelayRecord(self.record.client, Backend("/run/user/1000/docker.sock", 1000, "alice"), 0.0, Progress(), Progress())
        self.factory.routerPid = lambda: -1
        self.assertRaises(WrongOwner, self.factory.resume, record, self.client, self.daemon, (None, None))
        self.assertEqual(len(self.factory.relays), 0)

    def test_theRouterItself(self) -> None:
        self.assertRaises(RouterLoop, self.factory.resume, self.record, self.client, self.daemon, (None, None))

    def test_anotherClient(self) -> None:
        record = RelayRecord(
            Credentials(os.getpid() + 1, os.getuid(), os.getgid()), self.record.backend, 0.0, Progress(), Progress()
        )
        self.factory.routerPid = lambda: -1
        self.assertRaises(ValueError, self.factory.resume, record, self.client, self.daemon, (None, None))
