"""
From identity to backend, the security rule, and the reasons a user reads.
"""

import errno
import os

from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.backends import (
    Backend,
    BackendResolver,
    BackendUnusable,
    ConnectTimeout,
    DaemonRefuses,
    NoDaemon,
    NotASocket,
    PermissionDenied,
    RouterLoop,
    WrongOwner,
    explainConnectFailure,
    userName,
    verifyDaemon,
)
from dockerrouter.credentials import Credentials

ALICE = Backend(path="/run/user/1000/docker.sock", uid=1000, user="alice")


class ResolverTests(SynchronousTestCase):
    def test_fillsUidAndUser(self) -> None:
        resolver = BackendResolver("/srv/{user}/{uid}.sock", lookupName={1000: "alice"}.__getitem__)
        self.assertEqual(
            resolver.resolve(Credentials(pid=5, uid=1000, gid=1000)),
            Backend("/srv/alice/1000.sock", 1000, "alice"),
        )

    def test_nameFromUserDatabase(self) -> None:
        self.assertEqual(userName(0), "root")

    def test_uidWithoutName(self) -> None:
        """
        A uid the user database doesn't know still routes, by number.
        """
        self.assertEqual(userName(2**31 - 7), str(2**31 - 7))
        backend = BackendResolver("/run/user/{uid}/{user}.sock").resolve(
            Credentials(pid=1, uid=2**31 - 7, gid=0)
        )
        self.assertEqual(backend.path, f"/run/user/{2**31 - 7}/{2**31 - 7}.sock")


class VerifyDaemonTests(SynchronousTestCase):
    def test_sameUid(self) -> None:
        verifyDaemon(ALICE, Credentials(pid=77, uid=1000, gid=1000), routerPid=1)

    def test_otherUid(self) -> None:
        with self.assertRaises(WrongOwner) as caught:
            verifyDaemon(ALICE, Credentials(pid=77, uid=1001, gid=1001), routerPid=1)
        self.assertIn("runs as uid 1001, not as user alice (uid 1000)", caught.exception.message)
        self.assertIn("refuses", caught.exception.message)

    def test_root(self) -> None:
        """
        Root's daemon is just another user's daemon.
        """
        with self.assertRaises(WrongOwner):
            verifyDaemon(ALICE, Credentials(pid=77, uid=0, gid=0), routerPid=1)

    def test_routerItself(self) -> None:
        """
        A path leading back to the router is refused even for root, whose
        identity the inner hop would carry.
        """
        root = Backend(path="/run/user/0/docker.sock", uid=0, user="root")
        with self.assertRaises(RouterLoop):
            verifyDaemon(root, Credentials(pid=1, uid=0, gid=0), routerPid=1)


class ExplainTests(SynchronousTestCase):
    def explain(self, number: int, backend: Backend = ALICE) -> BackendUnusable:
        return explainConnectFailure(backend, OSError(number, os.strerror(number)))

    def test_missing(self) -> None:
        reason = self.explain(errno.ENOENT)
        self.assertIsInstance(reason, NoDaemon)
        self.assertEqual(reason.cause, "missing")
        for part in ("systemctl --user start docker", "--force", "loginctl enable-linger alice"):
            self.assertIn(part, reason.message)

    def test_refused(self) -> None:
        reason = self.explain(errno.ECONNREFUSED)
        self.assertIsInstance(reason, DaemonRefuses)

    def test_notASocket(self) -> None:
        """
        connect() answers "refused" for a regular file: the path tells them apart.
        """
        path = self.mktemp()
        open(path, "w").close()
        backend = Backend(path=path, uid=1000, user="alice")
        reason = self.explain(errno.ECONNREFUSED, backend)
        self.assertIsInstance(reason, NotASocket)

    def test_outOfDescriptors(self) -> None:
        reason = self.explain(errno.EMFILE)
        self.assertEqual((reason.cause, reason.status), ("router-busy", 503))

    def test_permission(self) -> None:
        reason = self.explain(errno.EACCES)
        self.assertIsInstance(reason, PermissionDenied)

    def test_other(self) -> None:
        reason = self.explain(errno.ELOOP)
        self.assertEqual(reason.cause, "unusable")
        self.assertIn(os.strerror(errno.ELOOP), reason.message)

    def test_everyMessageNamesUserUidAndPath(self) -> None:
        reasons = [
            NoDaemon(ALICE),
            DaemonRefuses(ALICE),
            NotASocket(ALICE),
            WrongOwner(ALICE, "0"),
            RouterLoop(ALICE),
            ConnectTimeout(ALICE, "5"),
            PermissionDenied(ALICE, "Permission denied"),
            BackendUnusable(ALICE, "Too many levels of symbolic links"),
        ]
        self.assertEqual(len({r.cause for r in reasons}), len(reasons))
        for reason in reasons:
            self.assertGreaterEqual(reason.status, 400)
            for part in ("alice", "1000", ALICE.path):
                self.assertIn(part, reason.message)


class RecentNamesTests(SynchronousTestCase):
    def test_rememberedForAWhile(self) -> None:
        from twisted.internet.task import Clock

        from dockerrouter import backends

        clock = Clock()
        lookups: list[int] = []
        def userName(uid: int) -> str:
            lookups.append(uid)
            return f"user{len(lookups)}"

        self.patch(backends, "userName", userName)
        names = backends.RecentNames(clock.seconds, ttl=60)
        self.assertEqual([names(1000), names(1000), names(1001)], ["user1", "user1", "user2"])
        clock.advance(60)
        self.assertEqual(names(1000), "user3")
        self.assertEqual(lookups, [1000, 1001, 1000])
