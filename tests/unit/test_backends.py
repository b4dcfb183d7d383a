"""
From identity to backend, the security rule, and the reasons a user reads.
"""

import errno
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.advice import Advice, findSetupTool
from dockerrouter.defaults import SETUP_TOOL
from dockerrouter.routing.reasons import (
    BackendUnusable,
    Concealed,
    ConnectTimeout,
    DaemonRefuses,
    DanglingLink,
    NoDaemon,
    NoRuntimeDirectory,
    NotASocket,
    PermissionDenied,
    RouterLoop,
    TooManyForUser,
    WrongOwner,
    checkSocketFile,
    explainConnectFailure,
    forTheUser,
    verifyDaemon,
)
from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.route import Backend
from dockerrouter.routing.credentials import Credentials
from dockerrouter.routing.rules import Account, Lookups, accountOf
from dockerrouter.routing.visibility import Found, Missing


def _socketStat(uid: int, ino: int = 7) -> os.stat_result:
    return os.stat_result((stat.S_IFSOCK | 0o600, ino, 3, 1, uid, uid, 0, 0, 0, 0))

ALICE = Backend(path="/run/user/1000/docker.sock", uid=1000, user="alice")


class ResolverTests(SynchronousTestCase):
    def test_fillsUidAndUser(self) -> None:
        resolver = BackendResolver("/srv/{user}/{uid}.sock", lookupName={1000: "alice"}.__getitem__)
        self.assertEqual(
            resolver.resolve(Credentials(pid=5, uid=1000, gid=1000)).candidates,
            (Backend("/srv/alice/1000.sock", 1000, "alice", 1000, "/srv/{user}/{uid}.sock"),),
        )

    def test_routeMadeOncePerAccount(self) -> None:
        """
        A user's route is made once and reused while their account is
        remembered; once it is looked up anew (a renamed user), the route
        follows it.
        """
        now = [0.0]
        names = {1000: "alice"}
        resolver = BackendResolver(
            "/srv/{user}.sock",
            lookups=Lookups(lambda: now[0], account=lambda uid: Account(names[uid]), ttl=60),
        )
        alice = Credentials(pid=5, uid=1000, gid=1000)
        first = resolver.resolve(alice)
        self.assertIs(resolver.resolve(alice), first)
        names[1000] = "alicia"
        self.assertIs(resolver.resolve(alice), first)
        now[0] = 61.0
        (backend,) = resolver.resolve(alice).candidates
        self.assertEqual((backend.path, backend.user), ("/srv/alicia.sock", "alicia"))

    def test_nameFromUserDatabase(self) -> None:
        self.assertEqual(accountOf(0), Account("root", "/root"))

    def test_uidWithoutName(self) -> None:
        """
        A uid the user database doesn't know still routes, by number.
        """
        self.assertEqual(accountOf(2**31 - 7), Account(str(2**31 - 7)))
        (backend,) = BackendResolver("/run/user/{uid}/{user}.sock").resolve(
            Credentials(pid=1, uid=2**31 - 7, gid=0)
        ).candidates
        self.assertEqual(backend.path, f"/run/user/{2**31 - 7}/{2**31 - 7}.sock")


class VerifyDaemonTests(SynchronousTestCase):
    def test_sameUid(self) -> None:
        verifyDaemon(ALICE, Credentials(pid=77, uid=1000, gid=1000), routerPid=1)

    def test_otherUid(self) -> None:
        with self.assertRaises(WrongOwner) as caught:
            verifyDaemon(ALICE, Credentials(pid=77, uid=1001, gid=1001), routerPid=1)
        self.assertIn("belongs to uid 1001, not to user alice (uid 1000)", caught.exception.message)
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
        # Issue 19.3: users can't linger themselves; it is the admin's step.
        self.assertIn("ask an administrator to run `loginctl enable-linger alice`", reason.message)

    def test_refused(self) -> None:
        reason = self.explain(errno.ECONNREFUSED)
        self.assertIsInstance(reason, DaemonRefuses)

    def test_notASocket(self) -> None:
        """
        Root connects only to a socket: a regular file is refused before.
        """
        path = self.mktemp()
        open(path, "w").close()
        with self.assertRaises(NotASocket):
            checkSocketFile(ALICE, os.stat(path))

    def test_socketOfAnotherUid(self) -> None:
        """
        Root connects only to a socket owned by the uid the daemon must run
        as (a systemd Accept=yes socket of root's would start a service).
        """
        with self.assertRaises(WrongOwner) as caught:
            checkSocketFile(ALICE, _socketStat(uid=0))
        self.assertIn("belongs to uid 0", caught.exception.message)
        checkSocketFile(ALICE, _socketStat(uid=1000))

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


class ForTheUserTests(SynchronousTestCase):
    """
    What the client may read: specific only about what they could see.
    """

    target = _socketStat(uid=1000, ino=7)

    def test_missingWhereTheyCanSee(self) -> None:
        reason = NoDaemon(ALICE)
        self.assertIs(forTheUser(reason, None, Missing(ALICE.path)), reason)

    def test_danglingLink(self) -> None:
        """
        Issue 9.4: a link to nothing says so, and names its target.
        """
        sight = Missing("/home/alice/.docker/run/docker.sock", (ALICE.path, "../.docker/run/docker.sock"))
        reason = forTheUser(NoDaemon(ALICE), None, sight)
        self.assertIsInstance(reason, DanglingLink)
        self.assertEqual(reason.cause, "missing")
        self.assertIn(
            f"{ALICE.path} is a symbolic link to ../.docker/run/docker.sock, which does not exist",
            reason.message,
        )

    def test_noRuntimeDirectory(self) -> None:
        """
        Issue 9.4: no /run/user/<uid> means not logged in and no linger.
        """
        reason = forTheUser(NoDaemon(ALICE), None, Missing("/run/user/1000"))
        self.assertIsInstance(reason, NoRuntimeDirectory)
        for part in ("no runtime directory /run/user/1000", "not logged in", "loginctl enable-linger alice"):
            self.assertIn(part, reason.message)
        self.assertIn("ask an administrator to run `loginctl enable-linger alice`", reason.message)

    def test_sameFileSeen(self) -> None:
        for reason in (NotASocket(ALICE), WrongOwner(ALICE, "0"), DaemonRefuses(ALICE)):
            self.assertIs(forTheUser(reason, self.target, Found(3, 7)), reason)

    def test_hidden(self) -> None:
        """
        A path the user can't follow, or one that changed between the
        router's look and theirs, reads the same whatever is there, with
        the real reason kept for the operator.
        """
        answers = set()
        for reason, target, sight in [
            (NoDaemon(ALICE), None, None),
            (WrongOwner(ALICE, "0"), self.target, None),
            (NotASocket(ALICE), self.target, Found(3, 8)),
            (NoDaemon(ALICE), None, Found(3, 7)),
            (BackendUnusable(ALICE, "Too many levels of symbolic links"), None, None),
        ]:
            judged = forTheUser(reason, target, sight)
            self.assertIsInstance(judged, Concealed)
            self.assertEqual(judged.cause, reason.cause)
            answers.add((judged.status, judged.message))
        self.assertEqual(len(answers), 1, answers)

    def test_notAboutThePath(self) -> None:
        reason = TooManyForUser(ALICE, "2")
        self.assertIs(forTheUser(reason, None, None), reason)


class AdviceTests(SynchronousTestCase):
    def test_setupToolOnPath(self) -> None:
        self.assertEqual(findSetupTool(which=lambda name: "/usr/bin/" + name), SETUP_TOOL)

    def test_setupToolWhereDebianPutsIt(self) -> None:
        """
        Issue 8.7: Debian's docker.io keeps it out of PATH; the advice puts
        its directory on PATH (the tool runs its sibling scripts by name).
        """
        directory = self.mktemp()
        os.mkdir(directory)
        tool = os.path.join(directory, SETUP_TOOL)
        with open(tool, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(tool, 0o755)
        found = findSetupTool(which=lambda name: None, directories=("/nonexistent", directory))
        self.assertEqual(found, f"PATH={directory}:$PATH {SETUP_TOOL}")
        message = Advice(setupTool=found).render(NoDaemon(ALICE))
        self.assertIn(f"`PATH={directory}:$PATH {SETUP_TOOL} install --force`", message)
        self.assertEqual(findSetupTool(which=lambda name: None, directories=()), SETUP_TOOL)

    def test_siteTextReplaces(self) -> None:
        message = Advice(site="see https://wiki.example/docker").render(NoDaemon(ALICE))
        self.assertEqual(
            message,
            "No Docker daemon is running for user alice (uid 1000): there is nothing at "
            f"{ALICE.path}; see https://wiki.example/docker.",
        )

    def test_siteTextExtends(self) -> None:
        message = Advice(site="{advice}, or ask help@example.org").render(NoDaemon(ALICE))
        self.assertIn("`systemctl --user start docker`", message)
        self.assertTrue(message.endswith("after you log out, or ask help@example.org."), message)

    def test_noAdviceToReplace(self) -> None:
        """
        Reasons that carry no advice of the router's (a cap) are left alone.
        """
        reason = TooManyForUser(ALICE, "2")
        self.assertEqual(Advice(site="see the wiki").render(reason), reason.message)
