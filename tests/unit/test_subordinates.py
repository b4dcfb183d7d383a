"""
Subordinate id ranges: the one parser of C{subuid(5)} files, and the ranges
that route a user's container processes to them.
"""

import os
import socket
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.credentials import Credentials
from dockerrouter.routing.namespaces import ROUTERS
from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.route import Backend
from dockerrouter.routing.rules import NeedLookup
from dockerrouter.routing.subordinates import SubordinateIds, SubordinateRange, loginDefsUidMin, subordinateRanges


class SubordinateRangesTests(SynchronousTestCase):
    def test_ranges(self) -> None:
        """
        Blank and C{#} lines are skipped; broken lines and ranges that are
        not positive are warned of, each naming its line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice:100000:65536\n\n# alice:1:2\nbroken\nalice:0:10\nbob:200000:0\n 1001:300000:10 \n")
        warnings: list[str] = []
        self.assertEqual(
            list(subordinateRanges(path, warnings.append)),
            [
                SubordinateRange("alice", 100000, 65536, 1, "alice:100000:65536"),
                SubordinateRange("1001", 300000, 10, 7, " 1001:300000:10 "),
            ],
        )
        self.assertEqual([w.split(": ignored")[0] for w in warnings], [f"{path}:4", f"{path}:5", f"{path}:6"])
        self.assertIn("not a positive range", warnings[1])

    def test_missingFile(self) -> None:
        warnings: list[str] = []
        self.assertEqual(list(subordinateRanges(self.mktemp(), warnings.append)), [])
        self.assertEqual(warnings, [])

    def test_warningsInLineOrder(self) -> None:
        """
        The router's own warnings of a line (an unknown user) come among
        the parser's in the file's order, as an operator reads the file.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nosuchuser-xyz:100000:10\nnonsense\nnosuchuser-abc:200000:10\n")
        warnings: list[str] = []
        ids = SubordinateIds(path, warnings.append, Clock().seconds)
        self.assertEqual(ids.owner(100001), 100001)
        self.assertEqual([w.split(": ignored")[0] for w in warnings], [f"{path}:1", f"{path}:2", f"{path}:3"])
        self.assertIn("'nosuchuser-xyz:100000:10'", warnings[0])


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
