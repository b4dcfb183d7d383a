"""
Caps per user and in total, subordinate uid ranges, and running out of
descriptors.
"""

import errno
import os
import resource
import socket
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.backends import Backend, BackendResolver, SubordinateIds, loginDefsUidMin
from dockerrouter.relay.settings import Settings
from dockerrouter.routing.credentials import Credentials
from dockerrouter.relay.limits import HEADROOM, AcceptBackoff, connectionsFor, raiseDescriptorLimit
from dockerrouter.relay.protocol import RouterFactory
from dockerrouter.routing.namespaces import ROUTERS
from dockerrouter.routing.rules import NeedLookup
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
        # Two sockets and a pipe each way: six descriptors a connection.
        self.assertEqual(connectionsFor(20000), 3316)
        self.assertEqual(connectionsFor(10), 1)


class SubordinateIdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.warnings: list[str] = []
        self.clock = Clock()
        self.ids = SubordinateIds(self.path, self.warnings.append, self.clock.seconds)

    def write(self, text: str) -> None:
        """
        Rewrite the file in place (same inode), with a modification time of
        its own, as any write leaves.
        """
        with open(self.path, "w") as f:
            f.write(text)
        self.writes = getattr(self, "writes", 0) + 1
        os.utime(self.path, ns=(self.writes, self.writes))

    def test_owner(self) -> None:
        self.write("1000:100000:65536\n1001:165536:65536\n")
        self.assertEqual(self.ids.owner(100000), 1000)
        self.assertEqual(self.ids.owner(165536 + 65535), 1001)
        self.assertEqual(self.ids.owner(165536 + 65536), 165536 + 65536)
        self.assertEqual(self.ids.owner(99999), 99999)
        self.assertEqual(self.ids.owner(1000), 1000)
        self.assertEqual(self.warnings, [])

    def test_readOffTheReactor(self) -> None:
        """
        With a thread to read in (names in the file are looked up in the
        user database), the first read is waited for (NeedLookup); later
        ones leave the last ranges standing until they are done, and their
        warnings come on the reactor thread.
        """
        reads: list[tuple[Deferred, Callable[..., Any], tuple]] = []

        def inThread(function: Callable[..., Any], *args: Any) -> Deferred:
            d: Deferred = Deferred()
            reads.append((d, function, args))
            return d

        def finish() -> None:
            d, function, args = reads.pop(0)
            d.callback(function(*args))

        ids = SubordinateIds(self.path, self.warnings.append, self.clock.seconds, inThread=inThread)
        self.write("1000:100000:65536\n")
        with self.assertRaises(NeedLookup) as waiting:
            ids.owner(100000)
        fired: list = []
        waiting.exception.deferred.addCallback(fired.append)
        finish()
        self.assertEqual((fired, ids.owner(100000)), ([None], 1000))
        self.write("0:100000:65536\n")
        self.clock.advance(ids.checkInterval)
        self.assertEqual(ids.owner(100000), 1000)  # being read again
        self.assertEqual((len(reads), self.warnings), (1, []))
        finish()
        self.assertEqual(ids.owner(100000), 100000)
        self.assertEqual(len(self.warnings), 1)

    def test_brokenAndOverlapping(self) -> None:
        self.write(
            "1000:100000:65536\n"
            "nonsense\n"
            "nosuchuser-xyz:300000:10\n"
            "1001:150000:65536\n"
            "1002:400000:65536\n"
        )
        self.assertEqual(self.ids.owner(100001), 100001)
        self.assertEqual(self.ids.owner(150001), 150001)
        self.assertEqual(self.ids.owner(400001), 1002)
        self.assertEqual(len(self.warnings), 4)
        self.assertTrue(any(":2: ignored" in w for w in self.warnings))
        self.assertTrue(any("overlaps" in w for w in self.warnings))

    def test_nestedOverlaps(self) -> None:
        """
        Issue 9.1: two ranges nested in a third are each ignored, not only
        the first (the neighbours after sorting), so 150005, in 1000's range
        and in 1002's, has no owner.
        """
        self.write("1000:100000:65536\n1001:110000:10\n1002:150000:10\n1003:300000:10\n")
        for uid in (100001, 110005, 150005):
            self.assertEqual(self.ids.owner(uid), uid)
        self.assertEqual(self.ids.owner(300005), 1003)
        self.assertEqual(sorted(w.split(":")[1] for w in self.warnings), ["1", "2", "3"])

    def test_chainedOverlaps(self) -> None:
        """
        A overlaps B, B overlaps C, A and C don't: all three are ignored;
        a range that only touches the chain's end is kept.
        """
        self.write("1000:100000:10\n1001:100005:10\n1002:100012:10\n1003:100022:10\n")
        for uid in (100001, 100010, 100020):
            self.assertEqual(self.ids.owner(uid), uid)
        self.assertEqual(self.ids.owner(100022), 1003)
        self.assertEqual(len(self.warnings), 3)

    def test_rootAndSystemOwnersIgnored(self) -> None:
        """
        Finding 12.2: ranges of root (Proxmox, LXD) or of a system account
        below UID_MIN route no one, with one warning each per reading.
        """
        self.write("root:100000:65536\n999:200000:65536\n1000:300000:65536\n")
        self.assertEqual(self.ids.owner(100001), 100001)
        self.assertEqual(self.ids.owner(200001), 200001)
        self.assertEqual(self.ids.owner(300001), 1000)
        self.assertEqual(self.ids.owner(100002), 100002)
        self.assertEqual(len(self.warnings), 2)
        self.assertTrue(all("below UID_MIN 1000" in w for w in self.warnings), self.warnings)

    def test_uidMinFromLoginDefs(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# UID_MIN 5\nUID_MAX 60000\nUID_MIN\t\t\t 500\n")
        self.assertEqual(loginDefsUidMin(path), 500)
        self.assertEqual(loginDefsUidMin(self.mktemp()), 1000)

    def test_reReadWhenChanged(self) -> None:
        """
        A change is seen within a second, even one that keeps the size and
        the inode; the file is not looked at on every connection.
        """
        self.write("1000:100000:65536\n")
        self.assertEqual(self.ids.owner(100001), 1000)
        self.write("1001:100000:65536\n")
        self.assertEqual(self.ids.owner(100001), 1000)
        self.clock.advance(SubordinateIds.checkInterval)
        self.assertEqual(self.ids.owner(100001), 1001)

    def test_reReadWhenReplaced(self) -> None:
        """
        A file renamed into place (as usermod does) is seen even with the
        same size and modification time.
        """
        self.write("1000:100000:65536\n")
        self.assertEqual(self.ids.owner(100001), 1000)
        replacement = self.path + ".new"
        with open(replacement, "w") as f:
            f.write("1001:100000:65536\n")
        os.utime(replacement, ns=(self.writes, self.writes))
        os.rename(replacement, self.path)
        self.clock.advance(SubordinateIds.checkInterval)
        self.assertEqual(self.ids.owner(100001), 1001)

    def test_missingFile(self) -> None:
        self.assertEqual(self.ids.owner(100001), 100001)

    def test_rootNeverMaps(self) -> None:
        self.write("1000:0:65536\n")
        self.assertEqual(self.ids.owner(0), 0)

    def resolver(self, owners: dict) -> BackendResolver:
        """Subordinate uids proven by a namespace owned by C{owners[pid]}."""
        self.write("1000:100000:65536\n")
        self.asked: list[int] = []
        # The client's socket: only the namespace owner below is asked about it.
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.sock.close)

        def namespaceOf(sock, client, groups):
            self.asked.append(client.pid)
            return owners.get(client.pid)

        return BackendResolver(
            "/run/user/{uid}/{user}.sock",
            lookupName=lambda uid: {1000: "alice"}.get(uid, str(uid)),
            subordinates=self.ids,
            namespaceOf=namespaceOf,
        )

    def resolve(self, resolver: BackendResolver, client: Credentials) -> Backend:
        """The first candidate of C{client}, judged on L{sock}."""
        return resolver.resolve(client, resolver.judge(client, self.sock)).candidates[0]

    def test_resolverRoutesToOwner(self) -> None:
        """
        A process in alice's rootless container (a namespace she owns)
        reaches alice's daemon, which must run as alice.
        """
        resolver = self.resolver({1: 1000})
        backend = self.resolve(resolver, Credentials(pid=1, uid=100999, gid=100999))
        self.assertEqual((backend.path, backend.uid, backend.user), ("/run/user/1000/alice.sock", 1000, "alice"))

    def test_resolverWithoutProof(self) -> None:
        """
        Finding 12.1: a uid in alice's range, in no namespace of hers (the
        router's own, one of another user's, or no answer), routes as itself.
        """
        resolver = self.resolver({2: None, 3: 1001, 5: ROUTERS})
        for pid in (2, 3, 4, 5):
            backend = self.resolve(resolver, Credentials(pid=pid, uid=100999, gid=100999))
            self.assertEqual(backend.uid, 100999)
        self.assertEqual(resolver.resolve(Credentials(pid=1, uid=100999, gid=0)).candidates[0].uid, 100999)

    def test_resolverAsksOnlyForSubordinates(self) -> None:
        """
        The common path stays as cheap as before: no namespace is read for
        a uid in no range.
        """
        resolver = self.resolver({})
        self.assertEqual(self.resolve(resolver, Credentials(pid=5, uid=1000, gid=0)).uid, 1000)
        self.assertEqual(self.asked, [])


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
