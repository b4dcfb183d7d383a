"""
Caps per user and in total, accept backoff, and running out of
descriptors.
"""

import errno
import os
import resource
import socket
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.relay.settings import Settings
from dockerrouter.routing.credentials import Credentials
from dockerrouter.relay.limits import HEADROOM, AcceptBackoff, connectionsFor, pipesFor, raiseDescriptorLimit
from dockerrouter.relay.factory import RouterFactory
from tests.unit.doubles import FakeSocket, InlineWorkers, PeerTransport, asSocket, notCached, socketFile


class CapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = RouterFactory(
            self.reactor,
            Settings(
                BackendResolver("/run/user/{uid}/docker.sock", lookupName=str),
                5,
                maxConnections=5,
                maxConnectionsPerUser=2,
            ),
            workers=InlineWorkers(),
        )
        self.factory.routerPid = lambda: -1
        self.connects: list[str] = []
        self.factory.openSocketFile = self.openSocketFile
        self.factory.openCached = notCached
        self.factory.connectUnix = self.connectUnix
        self.opened: list[int] = []

    def openSocketFile(self, path: str):
        """A socket owned by the uid its path names."""
        self.connects.append(path)
        uid = int(path.split("/")[3])
        self.opened.append(uid)
        return socketFile(uid)

    def connectUnix(self, path: str) -> socket.socket:
        """A daemon that runs as the uid of the socket opened last."""
        uid = self.opened[-1]
        return asSocket(FakeSocket(Credentials(pid=2, uid=uid, gid=uid)))

    def connect(self, uid: int):
        server = self.factory.buildProtocol(None)
        transport = PeerTransport(Credentials(pid=1, uid=uid, gid=uid))
        server.makeConnection(transport)
        if server._responder:
            server.dataReceived(b"GET /_ping HTTP/1.1\r\n\r\n")
        return server, transport

    def test_perUser(self) -> None:
        """
        A user over their cap is told so at once (HTTP 429 naming the limit)
        without a backend connection; other users are not affected.
        """
        self.connect(1000)
        self.connect(1000)
        attempts = len(self.connects)
        with capturedLogs() as events:
            third, transport = self.connect(1000)
        self.assertEqual(len(self.connects), attempts)
        self.assertIn(b"429 Too Many Requests", transport.value())
        self.assertIn(b"at most 2 connections", transport.value())
        self.assertEqual([e.get("cause") for e in events if "cause" in e], ["too-many"])
        _, other = self.connect(1001)
        self.assertEqual(other.value(), b"")
        self.assertEqual(len(self.connects), attempts + 1)

    def test_closingMakesRoom(self) -> None:
        first, _ = self.connect(1000)
        self.connect(1000)
        first.abort("test")
        _, transport = self.connect(1000)
        self.assertEqual(transport.value(), b"")

    def test_total(self) -> None:
        for uid in range(1000, 1005):
            self.connect(uid)
        _, transport = self.connect(2000)
        self.assertIn(b"429 Too Many Requests", transport.value())
        self.assertIn(b"its limit of 5 connections", transport.value())

    def test_defaultTotalFollowsDescriptors(self) -> None:
        # Two sockets a connection, beside the reserved descriptors and the
        # pipes' reserve: 9,900 idle relays fit under 20,000.
        self.assertGreaterEqual(connectionsFor(20000), 9900)
        for limit in (1024, 20000, 1 << 20):
            self.assertLessEqual(100 + 2 * pipesFor(limit) + 2 * connectionsFor(limit), limit)
        self.assertEqual(connectionsFor(10), 1)

    def test_pipeReserveFollowsDescriptors(self) -> None:
        # A share of the limit, never fewer than a few.
        self.assertEqual(pipesFor(20000), 49)
        self.assertEqual(pipesFor(10), 8)
        self.assertGreater(pipesFor(1 << 20), 2000)


class _FakePort:
    def __init__(self) -> None:
        self.socket: Any = self  # until the guard takes its place
        self.reading = True
        self.connected = True
        self.failWith: Optional[int] = errno.EMFILE
        self.accepted: list[socket.socket] = []

    # As a listening Unix socket: what the guard reads from it, and the
    # accept that hands over a descriptor (each queued socket gives its own).
    family = socket.AF_UNIX
    type = socket.SOCK_STREAM
    proto = 0

    def _accept(self):
        if self.failWith is not None:
            raise OSError(self.failWith, os.strerror(self.failWith))
        return self.accepted.pop(0).detach(), "peer"

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def getHost(self):
        class Address:
            name = "/run/docker.sock"

        return Address()


class AcceptBackoffTests(SynchronousTestCase):
    def test_pausesWarnsOnceAndResumes(self) -> None:
        clock = Clock()
        port = _FakePort()
        AcceptBackoff(clock, port, interval=0.5)
        with capturedLogs() as events:
            for _ in range(3):
                with self.assertRaises(BlockingIOError):
                    port.socket.accept()
        self.assertFalse(port.reading)
        self.assertEqual(len(events), 1)
        self.assertIn("EMFILE", events[0]["error"])
        clock.advance(0.4)
        self.assertFalse(port.reading)
        clock.advance(0.1)
        self.assertTrue(port.reading)

    def test_pausesBeforeTheLastDescriptors(self) -> None:
        """
        A client accepted into one of the last L{HEADROOM} descriptors is
        served, but accepting pauses: an admitted client must still be able
        to reach its daemon.  One accepted lower down changes nothing.
        """
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        clock = Clock()
        port = _FakePort()
        port.failWith = None
        low, high = socket.socketpair()
        self.addCleanup(high.close)
        later = socket.socket(fileno=os.dup(low.fileno()))
        # A descriptor number as high as the kernel gives when nearly full.
        nearlyFull = socket.socket(fileno=os.dup2(high.fileno(), soft - HEADROOM))
        port.accepted = [low, nearlyFull, later]
        numbers = [sock.fileno() for sock in port.accepted]
        AcceptBackoff(clock, port, interval=0.5)

        def accepted() -> int:
            client, _ = port.socket.accept()
            self.addCleanup(client.close)
            return client.fileno()

        with capturedLogs() as events:
            self.assertEqual(accepted(), numbers[0])
            self.assertTrue(port.reading)
            self.assertEqual(accepted(), numbers[1])
            self.assertRaises(BlockingIOError, port.socket.accept)
        self.assertFalse(port.reading)
        self.assertEqual([e["error"] for e in events], [f"fewer than {HEADROOM} left"])
        clock.advance(0.5)
        self.assertTrue(port.reading)
        self.assertEqual(accepted(), numbers[2])

    def test_otherErrorsPassThrough(self) -> None:
        port = _FakePort()
        port.failWith = errno.EINVAL
        AcceptBackoff(Clock(), port)
        with self.assertRaises(OSError) as caught:
            port.socket.accept()
        self.assertEqual(caught.exception.errno, errno.EINVAL)
        self.assertTrue(port.reading)

    def test_stoppedPortStaysStopped(self) -> None:
        clock = Clock()
        port = _FakePort()
        AcceptBackoff(clock, port)
        self.assertRaises(BlockingIOError, port.socket.accept)
        port.connected = False
        clock.advance(1)
        self.assertFalse(port.reading)


class DescriptorLimitTests(SynchronousTestCase):
    def test_raisesSoftToHard(self) -> None:
        original = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, original)
        soft, hard = original
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        expected = hard
        if hard == resource.RLIM_INFINITY:
            # No soft limit can be infinite: the kernel's ceiling instead.
            with open("/proc/sys/fs/nr_open") as f:
                expected = int(f.read())
        before, after = raiseDescriptorLimit()
        self.assertEqual((before, after), (min(soft, 256), expected))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], after)
