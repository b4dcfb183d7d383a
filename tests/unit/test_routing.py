"""
Rules, the default chain and the user database lookups routing needs.
"""

import threading
from typing import Any, Optional

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dockerrouter.service import config
from dockerrouter.routing.reasons import Denied, NoRoute
from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.route import Backend, Route
from dockerrouter.routing.credentials import Credentials
from dockerrouter.routing.namespaces import ROUTERS
from dockerrouter.defaults import DEFAULT_CHAIN
from dockerrouter.routing.rules import Account, Lookups, NeedLookup, Rule, RuleError, parseRules
from dockerrouter.service.tap import Options
from tests.unit.doubles import FakeSocket, asSocket

ALICE = Credentials(pid=5, uid=1000, gid=1000)
ACCOUNTS = {1000: Account("alice", "/home/alice"), 1001: Account("bob", "/home/bob"), 0: Account("root", "/root")}
USERS = {"alice": 1000, "bob": 1001, "root": 0}
GROUPS = {"docker": 998, "staff": 50}


def lookups(**kwargs) -> Lookups:
    return Lookups(account=lambda uid: ACCOUNTS.get(uid, Account(str(uid))), uid=USERS.get, gid=GROUPS.get, **kwargs)


def rules(text: str) -> tuple[Rule, ...]:
    import tomllib

    return parseRules(tomllib.loads(text)["rule"], lambda n: f"rule {n}")


class DefaultChainTests(SynchronousTestCase):
    def test_defaultChain(self) -> None:
        """
        The default: the setup tool's socket, Podman's, then the setup
        tool's fallback in the home directory of the user database.
        """
        route = BackendResolver(lookups=lookups()).resolve(ALICE)
        self.assertEqual(
            [b.path for b in route.candidates],
            [
                "/run/user/1000/docker.sock",
                "/run/user/1000/podman/podman.sock",
                "/home/alice/.docker/run/docker.sock",
            ],
        )
        self.assertEqual({(b.uid, b.owner, b.user) for b in route.candidates}, {(1000, 1000, "alice")})
        self.assertEqual([b.template for b in route.candidates], list(DEFAULT_CHAIN))

    def test_noHome(self) -> None:
        """A uid without an entry has no {home}: that candidate is left out."""
        route = BackendResolver().resolve(Credentials(pid=1, uid=2**31 - 7, gid=0))
        self.assertEqual(len(route.candidates), 2)
        with self.assertRaises(NoRoute) as caught:
            BackendResolver("{home}/d.sock").resolve(Credentials(pid=1, uid=2**31 - 7, gid=0))
        self.assertIn("the user database has none", caught.exception.message)


class RuleTests(SynchronousTestCase):
    example = rules(
        """
        [[rule]]
        user = "bob"
        deny = "Not you, bob."
        [[rule]]
        uid = 0
        user-socket = ["/run/docker-system.sock"]
        owner = "root"
        [[rule]]
        group = ["docker", 4242]
        user-socket = "/run/docker-system.sock"
        owner = 0
        [[rule]]
        user = 1000
        user-socket = ["/srv/{user}/a.sock", "/srv/{uid}/b.sock"]
        """
    )

    def resolve(self, client: Credentials, groups: Optional[tuple[int, ...]] = (), subordinates=None,
                rules: Optional[tuple[Rule, ...]] = None, where: Any = "default") -> Route:
        """
        Route C{client} in C{groups}, running in a namespace of
        C{where} (by default its container's owner for a subordinate uid,
        else the router's own).
        """
        if where == "default":
            where = ROUTERS if subordinates is None else 1000
        resolver = BackendResolver(lookups=lookups(), rules=self.example if rules is None else rules,
                                   subordinates=subordinates,
                                   namespaceOf=lambda sock, client, groups: where)
        return resolver.resolve(client, resolver.judge(client, asSocket(FakeSocket(client, groups))))

    def test_firstMatchWins(self) -> None:
        """
        alice (uid 1000) in group docker goes to the system daemon, which
        must run as root; without the group, her own rule applies.
        """
        (system,) = self.resolve(ALICE, groups=(998,)).candidates
        self.assertEqual((system.path, system.uid, system.owner), ("/run/docker-system.sock", 1000, 0))
        own = self.resolve(ALICE).candidates
        self.assertEqual([(b.path, b.owner) for b in own], [("/srv/alice/a.sock", 1000), ("/srv/1000/b.sock", 1000)])

    def test_groupByNumberAndPrimaryGid(self) -> None:
        """The primary gid (SO_PEERCRED) counts as one of the client's groups."""
        (system,) = self.resolve(Credentials(pid=5, uid=1000, gid=4242)).candidates
        self.assertEqual(system.owner, 0)

    def test_uidRuleAndOwnerByName(self) -> None:
        (system,) = self.resolve(Credentials(pid=5, uid=0, gid=0)).candidates
        self.assertEqual((system.path, system.owner, system.user), ("/run/docker-system.sock", 0, "root"))

    def test_deny(self) -> None:
        with self.assertRaises(Denied) as caught:
            self.resolve(Credentials(pid=5, uid=1001, gid=1001), groups=(998,))
        self.assertEqual(caught.exception.message, "Not you, bob.")
        self.assertEqual(caught.exception.status, 403)

    def test_unmatchedGetsTheDefault(self) -> None:
        resolver = BackendResolver("/x/{uid}.sock", lookups=lookups(), rules=self.example,
                                   namespaceOf=lambda sock, client, groups: ROUTERS)
        client = Credentials(pid=5, uid=2000, gid=2000)
        self.assertEqual(
            resolver.resolve(client, resolver.judge(client, asSocket(FakeSocket(client, (50,))))).candidates,
            (Backend("/x/2000.sock", 2000, "2000", 2000, "/x/{uid}.sock"),),
        )

    def test_containerProcessHasNoGroups(self) -> None:
        """
        A process in alice's container is matched as alice, but not by
        its groups (subordinate ids, whatever their numbers).
        """

        class Subordinates:
            def owner(self, uid: int) -> int:
                return 1000

        child = Credentials(pid=6, uid=100998, gid=998)
        route = self.resolve(child, groups=(998,), subordinates=Subordinates())
        self.assertEqual([b.path for b in route.candidates], ["/srv/alice/a.sock", "/srv/1000/b.sock"])

    def test_unknownGroupsFailClosed(self) -> None:
        """
        A client whose groups the kernel won't tell (more than 256), or a
        process in a user's container: a group's denial applies to it, a
        group's route is not granted.
        """
        denyInterns = rules(
            """
            [[rule]]
            group = 4343
            deny = "Not for interns."
            [[rule]]
            user = 1000
            user-socket = ["/srv/{user}.sock"]
            """
        )
        with self.assertRaises(Denied) as caught:
            self.resolve(ALICE, groups=None, rules=denyInterns)
        self.assertEqual(caught.exception.message, "Not for interns.")

        class Subordinates:
            def owner(self, uid: int) -> int:
                return 1000

        child = Credentials(pid=6, uid=100998, gid=998)
        self.assertRaises(Denied, self.resolve, child, subordinates=Subordinates(), rules=denyInterns)
        # In group 4343 or not, the kernel says so: a known outsider passes.
        (own,) = self.resolve(ALICE, groups=(50,), rules=denyInterns).candidates
        self.assertEqual(own.path, "/srv/alice.sock")
        # The example's docker group routes to root's daemon: not on a guess.
        chain = self.resolve(ALICE, groups=None).candidates
        self.assertEqual([b.owner for b in chain], [1000, 1000])

    def test_groupsOnlyInTheRoutersNamespace(self) -> None:
        """
        Findings 16.3 and 16.4: in a user namespace of its own (or one that
        can't be told), a client can map a gid to a group's number, or
        drop a group: neither its groups nor its primary gid count there,
        so a group's route is not granted and its deny applies.
        """
        denyInterns = rules(
            """
            [[rule]]
            group = 4343
            deny = "Not for interns."
            """
        )
        for where in (1000, 1001, None):
            chain = self.resolve(ALICE, groups=(998,), where=where).candidates
            self.assertEqual([b.owner for b in chain], [1000, 1000])
            chain = self.resolve(Credentials(pid=5, uid=1000, gid=4242), where=where).candidates
            self.assertEqual([b.owner for b in chain], [1000, 1000])
            self.assertRaises(Denied, self.resolve, ALICE, groups=(), rules=denyInterns, where=where)
        self.resolve(ALICE, groups=(), rules=denyInterns, where=ROUTERS)

    def test_unknownOwner(self) -> None:
        """An owner name the user database does not know routes nowhere."""
        resolver = BackendResolver(lookups=lookups(), rules=rules('[[rule]]\nuid = 1000\nuser-socket = ["/a"]\nowner = "nobody-here"'))
        with self.assertRaises(NoRoute) as caught:
            resolver.resolve(ALICE)
        self.assertIn("owner 'nobody-here', who is not in the user database", caught.exception.message)

    def test_mistakes(self) -> None:
        for text, expected in [
            ('[[rule]]\nuser-socket = ["/a"]', "needs uid, user or group"),
            ('[[rule]]\nuid = 1\n', "either user-socket or deny"),
            ('[[rule]]\nuid = 1\ndeny = "x"\nuser-socket = ["/a"]', "either user-socket or deny"),
            ('[[rule]]\nuid = "root"\ndeny = "x"', "uid must be numbers"),
            ('[[rule]]\nuid = -1\ndeny = "x"', "not a valid id"),
            ('[[rule]]\ngroup = true\ndeny = "x"', "group must be names or numbers"),
            ('[[rule]]\nuid = 1\nuser-socket = ["a/{uid}"]', "absolute"),
            ('[[rule]]\nuid = 1\nuser-socket = ["/{gid}"]', "only {uid}, {user} and {home}"),
            ('[[rule]]\nuid = 1\nuser-socket = []', "list of paths"),
            ('[[rule]]\nuid = 1\ndeny = "x"\nowner = 0', "owner goes with user-socket"),
            ('[[rule]]\nuid = 1\nuser-socket = ["/a"]\nowner = [0, 1]', "owner must be one"),
            ('[[rule]]\nuid = 1\ndeny = "x"\ngroups = "docker"', "unknown key 'groups'"),
        ]:
            with self.assertRaises(RuleError, msg=text) as caught:
                rules(text)
            self.assertIn(expected, str(caught.exception), text)
            self.assertIn("rule 1", str(caught.exception))

    def test_fileNamesTheRuleLine(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b'connect-timeout = 3\n\n[[rule]]\nuid = 1\ndeny = "x"\n\n[[rule]]\nuid = 2\n')
        with self.assertRaises(config.ConfigError) as caught:
            config.applyFile(Options(), path.path)
        self.assertIn(f"{path.path}, line 7 (rule 2): a rule needs either", str(caught.exception))

    def test_example(self) -> None:
        """etc/rules.toml, as shipped, is valid in a configuration file."""
        example = FilePath(__file__).parent().parent().parent().descendant(["etc", "rules.toml"])
        options = Options()
        config.applyFile(options, example.path)
        self.assertEqual(
            [(r.uids, r.users, r.groups, r.sockets, r.owner, r.deny is not None) for r in options["rule"]],
            [
                ((), ("mallory",), (), (), None, True),
                ((0,), (), (), ("/run/docker-system.sock",), "root", False),
                ((), (), ("docker",), ("/run/docker-system.sock",), "root", False),
            ],
        )


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[object] = []
        self.pending: list[Deferred] = []

    def inThread(self, function, key) -> Deferred:
        self.calls.append(key)
        d: Deferred = Deferred()
        self.pending.append(d)
        d.addCallback(lambda _: function(key))
        return d

    def test_offTheReactorThenRemembered(self) -> None:
        """
        An answer not known is fetched by inThread, once however many wait
        for it; each waiter is told when it is known, and then it is
        remembered (no second fetch) until the ttl passes; then it is still
        the answer while one fetch refreshes it.
        """
        names = lookups(clock=self.clock.seconds, inThread=self.inThread, ttl=60)
        waiters = []
        for _ in range(3):
            with self.assertRaises(NeedLookup) as caught:
                names.account(1000)
            waiters.append(caught.exception.deferred)
        self.assertEqual(self.calls, [1000])
        fired: list[object] = []
        for w in waiters:
            w.addCallback(fired.append)
        self.pending[0].callback(None)
        self.assertEqual(fired, [None, None, None])
        self.assertEqual(names.account(1000), Account("alice", "/home/alice"))
        self.clock.advance(59)
        self.assertEqual(names.account(1000).name, "alice")
        self.assertEqual(self.calls, [1000])
        self.clock.advance(1)
        self.assertEqual(names.account(1000).name, "alice")
        self.assertEqual(names.account(1000).name, "alice")
        self.assertEqual(self.calls, [1000, 1000])
        self.pending[1].callback(None)
        self.clock.advance(59)
        self.assertEqual(names.account(1000).name, "alice")
        self.assertEqual(self.calls, [1000, 1000])

    def test_failurePassedOn(self) -> None:
        names = lookups(clock=self.clock.seconds, inThread=self.inThread)
        with self.assertRaises(NeedLookup) as caught:
            names.gid("docker")
        failures: list = []
        caught.exception.deferred.addErrback(failures.append)
        self.pending[0].errback(OSError("ldap is down"))
        self.assertEqual([f.getErrorMessage() for f in failures], ["ldap is down"])
        self.assertRaises(NeedLookup, names.gid, "docker")

    def test_resolverWaitsForEachAnswer(self) -> None:
        """
        The resolver asks for what it needs, one answer at a time, and
        finds the chain once every answer is known.
        """
        resolver = BackendResolver(
            lookups=lookups(clock=self.clock.seconds, inThread=self.inThread),
            rules=RuleTests.example,
            namespaceOf=lambda sock, client, groups: ROUTERS,
        )
        judged = resolver.judge(ALICE, asSocket(FakeSocket(ALICE, (998,))))
        asked = 0
        while True:
            try:
                route = resolver.resolve(ALICE, judged)
                break
            except NeedLookup:
                asked += 1
                self.pending[-1].callback(None)
        # The uid rule needs no name; its owner is looked up only if it matches.
        self.assertEqual(self.calls, [1000, "bob", "docker"])
        self.assertEqual(asked, 3)
        self.assertEqual(route.candidates[0].owner, 0)


class SlowLookupTests(TestCase):
    def test_aSlowLookupHoldsNoOneElse(self) -> None:
        """
        In the reactor's real thread pool, a lookup that takes (up to) 2
        seconds leaves other users' lookups, and the reactor, free: bob's
        answer arrives while alice's is still being looked up.
        """
        release = threading.Event()

        def account(uid: int) -> Account:
            if uid == 1000:
                release.wait(2)
            return ACCOUNTS[uid]

        names = Lookups(globalReactor.seconds, deferToThread, account=account)
        order: list[str] = []
        with self.assertRaises(NeedLookup) as slow:
            names.account(1000)
        slow.exception.deferred.addCallback(lambda _: order.append("alice"))
        with self.assertRaises(NeedLookup) as fast:
            names.account(1001)

        def bobKnown(_: object) -> Deferred:
            order.append("bob")
            self.assertEqual(names.account(1001).name, "bob")
            self.assertRaises(NeedLookup, names.account, 1000)
            release.set()
            return slow.exception.deferred

        fast.exception.deferred.addCallback(bobKnown)
        return fast.exception.deferred.addCallback(lambda _: self.assertEqual(order, ["bob", "alice"]))
