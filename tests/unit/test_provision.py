"""
Provisioning (C{--provision}) with a Clock, a fake process runner and a
host laid out in a temporary directory: who gets a daemon set up, what is
checked first, the subordinate range it adds, the steps as the user, one
provisioning per user through the starter, the timeout.
"""

import json
import os
import pwd
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.cli import formatTable
from dockerrouter.relay.factory import RouterFactory
from dockerrouter.relay.settings import Settings
from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.route import Backend
from dockerrouter.service.control import liveStatus
from dockerrouter.service import provision
from dockerrouter.service.provision import (
    Host,
    Policy,
    ProvisionFailed,
    ProvisionRefused,
    Provisioner,
    ProvisionTimedOut,
    ProvisionUnmet,
    freeRange,
    homeProblem,
    plan,
)
from dockerrouter.service.starter import Starter
from tests.unit.doubles import InlineWorkers
from tests.unit.test_starter import FakeRunner

ALICE = Backend("/run/user/1001/docker.sock", 1001, "alice")
BOB = Backend("/run/user/1002/docker.sock", 1002, "bob")
TOOLS = ("dockerd", "dockerd-rootless.sh", "rootlesskit", "slirp4netns", "newuidmap", "newgidmap", "podman")
DOCKER_USERS = 2000


class FakeHost:
    """A host in a temporary directory: tools, user units, id files, accounts."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.bin = os.path.join(root, "bin")
        self.units = os.path.join(root, "units")
        os.makedirs(self.bin)
        os.makedirs(self.units)
        for tool in TOOLS:
            self.addTool(tool)
        for unit in ("dbus.socket", "podman.socket"):
            open(os.path.join(self.units, unit), "w").close()
        self.write("subuid", "")
        self.write("subgid", "")
        self.write("login.defs", "UID_MIN 1000\nSUB_UID_MIN 100000\nSUB_UID_MAX 600100000\n")
        self.accounts: dict[int, pwd.struct_passwd] = {}
        self.members: dict[str, list[str]] = {}
        for backend in (ALICE, BOB):
            self.addAccount(backend.uid, backend.user)

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.root, name), "w") as f:
            f.write(text)

    def append(self, name: str, text: str) -> None:
        with open(os.path.join(self.root, name), "a") as f:
            f.write(text)

    def addTool(self, name: str) -> None:
        path = os.path.join(self.bin, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o755)

    def addAccount(self, uid: int, name: str, home: Optional[str] = None) -> str:
        if home is None:
            home = os.path.join(self.root, "home", name)
            os.makedirs(home)
            os.chown(home, uid, uid)
        self.accounts[uid] = pwd.struct_passwd((name, "x", uid, uid, "", home, "/bin/sh"))
        return home

    def groupList(self, name: str, gid: int) -> list[int]:
        return [gid] + [g for g, users in enumerate(self.members.values(), DOCKER_USERS) if name in users]

    def group(self, name: str) -> Any:
        if name not in self.members:
            raise KeyError(name)
        return type("Group", (), {"gr_gid": DOCKER_USERS + list(self.members).index(name)})

    def host(self) -> Host:
        def account(uid: int) -> pwd.struct_passwd:
            return self.accounts[uid]

        return Host(
            subuid=os.path.join(self.root, "subuid"),
            subgid=os.path.join(self.root, "subgid"),
            loginDefs=os.path.join(self.root, "login.defs"),
            path=self.bin,
            userUnits=self.units,
            dockerContrib=os.path.join(self.root, "contrib"),
            records=os.path.join(self.root, "records"),
            account=account,
            group=self.group,
            groupList=self.groupList,
        )


def inline(function: Any, *args: Any) -> Deferred:
    """Run 'in a thread' at once (the tests' thread is the only one)."""
    return defer.maybeDeferred(function, *args)


class PlanTests(SynchronousTestCase):
    """Whom the router sets a daemon up for, and what is checked first."""

    def setUp(self) -> None:
        self.fake = FakeHost(os.path.abspath(self.mktemp()))
        self.fake.write("subuid", "alice:100000:65536\n")
        self.fake.write("subgid", "alice:100000:65536\n")

    def plan(self, backend: Backend = ALICE, **policy: Any) -> Any:
        return plan(backend, Policy(**policy), self.fake.host(), 1000)

    def test_aUserWithEverythingGetsDocker(self) -> None:
        planned = self.plan()
        self.assertIsInstance(planned, provision.Plan)
        self.assertEqual((planned.kind, planned.bin, planned.needSubuids), ("docker", self.fake.bin, False))

    def test_preferenceOrder(self) -> None:
        self.assertEqual(self.plan(kinds=("podman", "docker")).kind, "podman")
        os.remove(os.path.join(self.fake.bin, "dockerd"))
        self.assertEqual(self.plan(kinds=("docker", "podman")).kind, "podman")

    def test_neverForSystemAccountsOrRoot(self) -> None:
        for uid in (0, 999):
            self.fake.addAccount(uid, f"system{uid}")
            kind, why = self.plan(Backend(f"/run/user/{uid}/docker.sock", uid, f"system{uid}"))
            self.assertEqual((kind, why), (ProvisionRefused, f"uid {uid} is a system account (below UID_MIN 1000)"))

    def test_onlyMembersOfTheGroup(self) -> None:
        self.fake.members["docker-users"] = ["bob"]
        kind, why = self.plan(group="docker-users")
        self.assertEqual((kind, why), (ProvisionRefused, "only members of the group docker-users have one set up"))
        self.fake.members["docker-users"].append("alice")
        self.assertIsInstance(self.plan(group="docker-users"), provision.Plan)

    def test_homeThatIsALinkToRoot(self) -> None:
        home = os.path.join(self.fake.root, "linked")
        os.symlink("/root", home)
        self.fake.addAccount(1003, "mallory", home)
        kind, why = self.plan(Backend("/run/user/1003/docker.sock", 1003, "mallory"))
        self.assertIs(kind, ProvisionRefused)
        self.assertIn("is a symbolic link", why)

    def test_homeProblems(self) -> None:
        root = self.fake.root
        self.assertIsNone(homeProblem(os.path.join(root, "home", "alice"), 1001))
        self.assertIn("belongs to uid 1001", homeProblem(os.path.join(root, "home", "alice"), 1002) or "")
        self.assertIn("does not exist", homeProblem(os.path.join(root, "nowhere"), 1001) or "")
        self.assertIn("no directory of its own", homeProblem("/", 1001) or "")
        # Under a link the user owns (they could point it anywhere).
        os.symlink(os.path.join(root, "home"), os.path.join(root, "theirs"))
        os.lchown(os.path.join(root, "theirs"), 1001, 1001)
        self.assertIn("is a symbolic link", homeProblem(os.path.join(root, "theirs", "alice"), 1001) or "")

    def test_missingPackagesNamedWithTheFix(self) -> None:
        os.remove(os.path.join(self.fake.bin, "newgidmap"))
        os.remove(os.path.join(self.fake.bin, "slirp4netns"))
        os.remove(os.path.join(self.fake.units, "dbus.socket"))
        kind, why = self.plan()
        self.assertIs(kind, ProvisionUnmet)
        self.assertEqual(why, "dbus-user-session, slirp4netns, uidmap are not installed; ask the host's "
                         "administrator to run `apt-get install dbus-user-session slirp4netns uidmap`")

    def test_nothingInstalled(self) -> None:
        os.remove(os.path.join(self.fake.bin, "dockerd"))
        kind, why = self.plan(kinds=("docker",))
        self.assertIs(kind, ProvisionUnmet)
        self.assertIn("none of docker is installed", why)

    def test_noSubordinateIdsNamesTheCommand(self) -> None:
        kind, why = self.plan(BOB)
        self.assertIs(kind, ProvisionUnmet)
        self.assertIn("no subordinate id range in ", why)
        self.assertIn("`usermod --add-subuids 165536-231071 --add-subgids 165536-231071 bob`", why)

    def test_noSubordinateIdsWithProvisionSubids(self) -> None:
        planned = self.plan(BOB, addSubids=True)
        self.assertEqual((planned.needSubuids, planned.needSubgids), (True, True))


class FreeRangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeHost(os.path.abspath(self.mktemp()))

    def test_firstFreeAboveSubUidMin(self) -> None:
        self.assertEqual(freeRange(self.fake.host(), 1000), (100000, 165535))

    def test_neverBelowUidMin(self) -> None:
        self.fake.write("login.defs", "UID_MIN 200000\nSUB_UID_MIN 1000\n")
        self.assertEqual(freeRange(self.fake.host(), 200000), (200000, 265535))

    def test_overlapsNoRangeOfEitherFile(self) -> None:
        self.fake.write("subuid", "a:100000:65536\nb:300000:10\n")
        self.fake.write("subgid", "c:165536:100\n")
        first, last = freeRange(self.fake.host(), 1000) or (0, 0)
        self.assertEqual((first, last), (165636, 231171))
        # A gap big enough between two ranges is used.
        self.fake.write("subgid", "")
        self.assertEqual(freeRange(self.fake.host(), 1000), (165536, 231071))

    def test_noRoomLeft(self) -> None:
        self.fake.write("login.defs", "SUB_UID_MIN 100000\nSUB_UID_MAX 200000\n")
        self.fake.write("subuid", "a:100000:65536\n")
        self.assertIsNone(freeRange(self.fake.host(), 1000))


class ProvisionerTests(SynchronousTestCase):
    """The steps, as the user, with a fake runner and a Clock."""

    def setUp(self) -> None:
        self.fake = FakeHost(os.path.abspath(self.mktemp()))
        self.fake.write("subuid", "alice:100000:65536\n")
        self.fake.write("subgid", "alice:100000:65536\n")
        self.clock = Clock()
        self.runner = FakeRunner()
        self.up: set[int] = set()
        self.provisioner = self.make()

    def make(self, **policy: Any) -> Provisioner:
        return Provisioner(self.clock, self.runner, Policy(**policy), self.fake.host(), 1000, inline)

    def provision(self, backend: Backend = ALICE) -> list:
        fired: list = []
        self.provisioner.provision(backend, lambda: defer.succeed(backend.uid in self.up)).addCallback(fired.append)
        return fired

    def test_dockerStepsAsTheUser(self) -> None:
        with capturedLogs() as events:
            fired = self.provision()
            self.assertEqual(self.runner.answer(), ["/usr/bin/systemctl", "start", "user@1001.service"])
            write = self.runner.answer()
            reload = self.runner.answer()
            enable = self.runner.answer()
        for argv in (write, reload, enable):
            self.assertEqual(argv[:2], ["/usr/bin/systemd-run", "--uid=1001"])
            self.assertIn("--setenv=XDG_RUNTIME_DIR=/run/user/1001", argv)
        self.assertEqual(write[-5:-1], ["/bin/sh", "-c", write[-3], "sh"])
        self.assertIn(f"ExecStart={self.fake.bin}/dockerd-rootless.sh\n", write[-1])
        self.assertEqual(reload[-2:], ["--user", "daemon-reload"])
        self.assertEqual(enable[-4:], ["--user", "enable", "--now", "docker.service"])
        # Not answering yet: polled until it does.
        self.assertEqual(fired, [])
        self.up.add(1001)
        self.clock.advance(1)
        self.assertEqual(fired, [None])
        self.assertEqual(self.provisioner.counts["provisioned"], 1)
        record = self.provisioner.records[1001]
        self.assertEqual((record["user"], record["kind"]), ("alice", "docker"))
        with open(os.path.join(self.fake.root, "records", "1001.json")) as f:
            self.assertEqual(json.load(f), record)
        lines = [formatEvent(e) for e in events]
        self.assertIn("provision: user alice (uid 1001): setting up rootless docker", lines)
        self.assertIn("provision: user alice (uid 1001): enable docker.service", lines)

    def test_theUnitWriterRefusesToOverwrite(self) -> None:
        """The shell the user runs leaves a unit of theirs alone (exit 3), said as such."""
        fired = self.provision()
        self.runner.answer()
        write = self.runner.answer(code=3)
        home = os.path.join(self.fake.root, "home", "alice")
        unit = os.path.join(home, ".config", "systemd", "user", "docker.service")
        os.makedirs(os.path.dirname(unit))
        with open(unit, "w") as f:
            f.write("mine\n")
        # The script itself, run here with that home: exit 3 and the file untouched.
        status = os.spawnve(os.P_WAIT, "/bin/sh", write[-5:], {"HOME": home, "PATH": "/usr/bin:/bin"})
        self.assertEqual(status, 3)
        with open(unit) as f:
            self.assertEqual(f.read(), "mine\n")
        os.remove(unit)
        self.assertEqual(os.spawnve(os.P_WAIT, "/bin/sh", write[-5:], {"HOME": home, "PATH": "/usr/bin:/bin"}), 0)
        with open(unit) as f:
            self.assertEqual(f.read(), write[-1])
        [reason] = fired
        self.assertIsInstance(reason, ProvisionRefused)
        self.assertIn("has a docker.service of their own", reason.message)
        self.assertEqual(self.runner.pending(), [])

    def test_podman(self) -> None:
        self.provisioner = self.make(kinds=("podman",))
        self.provision()
        self.runner.answer()
        enable = self.runner.answer()
        self.assertEqual(enable[1], "--uid=1001")
        self.assertEqual(enable[-4:], ["--user", "enable", "--now", "podman.socket"])

    def test_aFailedStep(self) -> None:
        fired = self.provision()
        self.runner.answer()
        self.runner.answer()
        self.runner.answer(err=b"Failed to connect to bus\n", code=1)
        [reason] = fired
        self.assertIsInstance(reason, ProvisionFailed)
        self.assertIn("reload the user's manager failed: Failed to connect to bus", reason.message)
        self.assertEqual(self.provisioner.counts["failed"], 1)
        self.assertFalse(os.path.exists(os.path.join(self.fake.root, "records")))

    def test_timeoutKillsTheStepUnderWay(self) -> None:
        fired = self.provision()
        self.runner.answer()
        self.clock.advance(119)
        self.assertEqual(fired, [])
        self.clock.advance(1)
        [reason] = fired
        self.assertIsInstance(reason, ProvisionTimedOut)
        self.assertEqual(reason.status, 504)
        self.assertIn("within 120 seconds (at: write docker.service)", reason.message)
        self.assertEqual(len(self.runner.killed), 1)
        self.assertEqual(self.provisioner.counts["timeout"], 1)

    def test_refusedAndUnmetAreCounted(self) -> None:
        self.fake.addAccount(999, "daemon")
        [refused] = self.provision(Backend("/run/user/999/docker.sock", 999, "daemon"))
        [unmet] = self.provision(BOB)
        self.assertEqual((type(refused), type(unmet)), (ProvisionRefused, ProvisionUnmet))
        self.assertEqual((self.provisioner.counts["refused"], self.provisioner.counts["unmet"]), (1, 1))
        self.assertEqual(self.runner.calls, [])

    def test_subordinateRangesNeverShared(self) -> None:
        """
        Two users set up at once: the second range is chosen only after the
        first usermod wrote its own, so they never overlap.
        """
        self.fake.write("subuid", "")
        self.fake.write("subgid", "")
        self.provisioner = self.make(addSubids=True)
        self.provision(ALICE)
        self.provision(BOB)
        firstAdds = [argv for argv in self.runner.pending() if "/usr/sbin/usermod" in argv]
        # Run by the system manager, outside the router's sandbox.
        self.assertEqual(firstAdds[0][0], "/usr/bin/systemd-run")
        self.assertEqual([argv[argv.index("/usr/sbin/usermod"):] for argv in firstAdds],
                         [["/usr/sbin/usermod", "--add-subuids", "100000-165535",
                           "--add-subgids", "100000-165535", "alice"]])
        # usermod writes the files, as the real one would.
        self.fake.append("subuid", "alice:100000:65536\n")
        self.fake.append("subgid", "alice:100000:65536\n")
        [d] = [d for argv, d in self.runner.calls if "/usr/sbin/usermod" in argv]
        d.callback((b"", b"", 0))
        second = [argv[argv.index("/usr/sbin/usermod"):] for argv in self.runner.pending() if "/usr/sbin/usermod" in argv]
        self.assertEqual(second, [["/usr/sbin/usermod", "--add-subuids", "165536-231071",
                                   "--add-subgids", "165536-231071", "bob"]])


class StarterHandsOverTests(SynchronousTestCase):
    """The starter provisions when nothing is enabled: once per user, cooling down after a failure."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = FakeRunner()
        self.calls: list[Deferred] = []
        self.starter = Starter(
            self.clock,
            probe=lambda backend: defer.succeed(False),
            run=self.runner,
            home=lambda uid: defer.succeed("/home/x"),
            uidMin=1000,
            coolDown=60.0,
        )
        starter = self

        class Fake:
            def provision(self, backend: Backend, ready: Any) -> Deferred:
                d: Deferred = Deferred()
                starter.calls.append(d)
                return d

            def refusal(self, backend: Backend, why: str) -> ProvisionRefused:
                return ProvisionRefused(backend, why)

        self.starter.provisioner = Fake()

    def start(self, backend: Backend = ALICE) -> list:
        fired: list = []
        self.starter.start(backend, 30.0).addCallback(fired.append)
        return fired

    def test_oneProvisioningForEveryoneOfTheUser(self) -> None:
        first, second = self.start(), self.start()
        self.runner.answer(b"")  # nothing enabled (asked as the user, before any manager runs)
        self.assertEqual(len(self.calls), 1)
        # The start's own 30 s no longer apply: provisioning has its deadline.
        self.clock.advance(60)
        self.assertEqual((first, second), ([], []))
        self.calls[0].callback(None)
        self.assertEqual((first, second), ([None], [None]))
        self.assertEqual(self.starter.counts["started"], 1)

    def test_failureCoolsDown(self) -> None:
        fired = self.start()
        self.runner.answer(b"")  # nothing enabled
        reason = ProvisionFailed(ALICE, "boom")
        self.calls[0].callback(reason)
        self.assertEqual(fired, [reason])
        self.assertEqual(self.start(), [reason])
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(61)
        self.start()
        self.assertEqual(len(self.runner.pending()), 1)

    def test_systemAccountHearsWhy(self) -> None:
        [reason] = self.start(Backend("/run/user/999/docker.sock", 999, "daemon"))
        self.assertIsInstance(reason, ProvisionRefused)
        self.assertIn("uid 999 is below UID_MIN 1000", reason.message)
        self.assertEqual(self.runner.calls, [])


class StatusTests(SynchronousTestCase):
    def test_statusSaysWhomTheRouterSetUp(self) -> None:
        """The control endpoint lists the router's records; `docker-router status` prints them."""
        factory = RouterFactory(MemoryReactorClock(), Settings(BackendResolver("/x/{uid}"), 5), workers=InlineWorkers())
        provisioner = type("P", (), {"records": {1001: dict(user="alice", uid=1001, kind="docker",
                                                            at="2026-12-07T19:00:00+0000", steps=[])}})()
        factory.starter = type("S", (), {"provisioner": provisioner})()
        status = liveStatus(factory)
        self.assertEqual(status["provisioned"], [dict(user="alice", uid=1001, kind="docker",
                                                      at="2026-12-07T19:00:00+0000")])
        self.assertIn("set up by docker-router: alice (uid 1001), rootless docker, at 2026-12-07T19:00:00+0000",
                      formatTable(status))
