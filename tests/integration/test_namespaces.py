"""
What a client in a user namespace of its own can't claim (issue 16): a
group it mapped there (finding 3) or the absence of one it dropped there
(finding 4); and, on a kernel without C{SO_PEERPIDFD}, a pid it freed for a
process of someone's container to take (finding 2).

The namespaces are real, made as rootless runtimes make them: an account of
the test's own (in the user database, with C{/etc/subuid} and
C{/etc/subgid} ranges, added here and removed after) unshares, and the
setuid C{newuidmap} and C{newgidmap} map it.  A kernel without
C{SO_PEERPIDFD} is had with an C{LD_PRELOAD} shim (C{nopeerpidfd.c}).
"""

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import unittest

from tests.integration.harness import IntegrationTestCase, b64, lineRequest, parseResponse, pollUntil, unb64
from tests.pids import spawnAtPid

OWNER = "dr-ns-owner"
OWNER_UID = 61021
START = 4_200_000
COUNT = 65536
# A group's number inside the owner's subordinate gid range.
PRIVILEGED = START + 1
DENIED = 4_400_000
_STAY = "import sys; print('here', flush=True); sys.stdin.read()"


def run(*command, **kwargs):
    subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


class NamespaceTestCase(IntegrationTestCase):
    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("integration tests run as root")
        for tool in ("newuidmap", "newgidmap", "nsenter", "useradd", "cc"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is needed (uidmap, util-linux, passwd, gcc)")
        try:
            pwd.getpwnam(OWNER)
        except KeyError:
            run("useradd", "--no-create-home", "--user-group", "--uid", str(OWNER_UID), "--shell", "/usr/sbin/nologin", OWNER)
        self.addCleanup(run, "userdel", OWNER)
        ids = f"{START}-{START + COUNT - 1}"
        run("usermod", "--add-subuids", ids, "--add-subgids", ids, OWNER)
        self.addCleanup(run, "usermod", "--del-subuids", ids, "--del-subgids", ids, OWNER)
        self.gid = pwd.getpwnam(OWNER).pw_gid
        # Now: its processes (the harness's) end before the account.
        IntegrationTestCase.setUp(self)
        self.subuid = os.path.join(self.harness.tmp, "subuid")
        with open(self.subuid, "w") as f:
            f.write(f"{OWNER_UID}:{START}:{COUNT}\n")

    def shim(self, *defines):
        """The LD_PRELOAD shim built with C{defines}: a kernel without SO_PEERPIDFD."""
        source = os.path.join(os.path.dirname(__file__), "nopeerpidfd.c")
        library = os.path.join(self.harness.tmp, "nopeerpidfd%d.so" % (len(defines),))
        run("cc", "-shared", "-fPIC", *defines, "-o", library, source, "-ldl")
        return ["env", "LD_PRELOAD=" + library]

    def ownNamespace(self, uidMap, gidMap, groups=()):
        """
        An agent of OWNER, in C{groups}, in a user namespace of its own
        mapped (by OWNER, through newuidmap and newgidmap) as C{uidMap} and
        C{gidMap} say (triples of inside, outside, count).
        """
        agent = self.harness.startAgent(OWNER_UID, self.gid, groups)
        pid = str(agent.call("unshareUser")["pid"])
        for tool, triples in (("newuidmap", uidMap), ("newgidmap", gidMap)):
            numbers = [str(n) for triple in triples for n in triple]
            run(tool, pid, *numbers, user=OWNER_UID, group=self.gid, extra_groups=[])
        return agent

    def container(self):
        """An agent of OWNER's rootless container: its namespace, mapped whole."""
        agent = self.ownNamespace(
            [(0, OWNER_UID, 1), (1, START, COUNT)], [(0, self.gid, 1), (1, START, COUNT)]
        )
        agent.call("becomeIds", uid=5, gid=5)
        return agent, START + 4

    def ping(self, agent, router):
        return agent.call("http", path=router.listenPath, method="GET", url="/_ping")


class GroupTests(NamespaceTestCase):
    def config(self, text):
        path = os.path.join(self.harness.tmp, "router.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_aGroupMappedInOnesOwnNamespace(self):
        """
        Finding 3: OWNER, in no group PRIVILEGED, maps gid 50002 of a
        namespace of her own to PRIVILEGED (a gid of her subgid range),
        takes it with setgroups and connects: root's daemon (a decoy) sees
        nothing; she reaches her own.  The router warns about the rule.
        """
        decoy = self.harness.startDecoy(os.path.join(self.harness.tmp, "rootful.sock"))
        config = self.config(
            f'[[rule]]\ngroup = {PRIVILEGED}\nuser-socket = ["{decoy.path}"]\nowner = 0\n'
        )
        self.harness.startBackend(OWNER_UID, "http")
        router = self.harness.startRouter(["--config", config, "--subgid-file", "/etc/subgid"])
        agent = self.ownNamespace([(0, OWNER_UID, 1)], [(0, self.gid, 1), (50002, PRIVILEGED, 1)])
        self.assertEqual(agent.call("setGroups", groups=[50002])["groups"], [50002])
        self.assertServedBy(self.ping(agent, router), OWNER_UID, router)
        decoy.settle()
        self.assertEqual((decoy.count("accepted"), decoy.receivedBytes()), (0, 0))
        warning = r"group %d is gid %d, inside the subordinate gid range of uid %d" % (PRIVILEGED, PRIVILEGED, OWNER_UID)
        router.waitLog(warning)
        os.kill(router.pid, signal.SIGHUP)
        pollUntil(lambda: len(router.logMatches(warning)) == 2, 10, what="the warning again on reload")

    def test_aDeniedGroupDroppedInOnesOwnNamespace(self):
        """
        Finding 4: OWNER, in the denied group DENIED, drops it with
        setgroups([]) in a namespace of her own (newgidmap allows it once
        a subordinate gid is mapped too): the deny still applies.
        """
        config = self.config(f'[[rule]]\ngroup = {DENIED}\ndeny = "Not for interns."\n')
        self.harness.startBackend(OWNER_UID, "http")
        router = self.harness.startRouter(["--config", config])
        agent = self.ownNamespace([(0, OWNER_UID, 1)], [(0, self.gid, 1), (1, START, 1)], groups=[DENIED])
        self.assertEqual(agent.call("setGroups", groups=[])["groups"], [])
        reply = self.ping(agent, router)
        self.assertEqual(reply.get("status"), 403, reply)
        self.assertEqual(json.loads(unb64(reply["body"]))["message"], "Not for interns.")


class WithoutPeerPidfdTests(NamespaceTestCase):
    """The router on a kernel before 6.5 (the shim), where pids are all it is told."""

    def test_aPidTakenByTheOwnersContainer(self):
        """
        Finding 2: a real account inside OWNER's range (in the router's
        namespace) connects while the router is held, hands the socket on
        and exits; a process of OWNER's container takes its pid; the router
        goes on.  OWNER's daemon (a decoy) never sees a connection, and the
        attacker is answered by its own.
        """
        router = self.harness.startRouter(["--subuid-file", self.subuid], wrapper=self.shim())
        decoy = self.harness.startDecoy(self.harness.backendPath(OWNER_UID), uid=OWNER_UID)
        attacker = START + 500
        self.harness.startBackend(attacker, "http")
        owners, _ = self.container()
        mallory = self.harness.startAgent(attacker)
        os.kill(router.pid, signal.SIGSTOP)
        try:
            pollUntil(lambda: _state(router.pid) == "T", 10, what="the router to stop")
            freed = mallory.call("connectInChild", path=router.listenPath)["pid"]
            holder = spawnAtPid(
                freed,
                ["nsenter", f"--user=/proc/{owners.ready['pid']}/ns/user", "--setuid=5", "--setgid=5",
                 "--", sys.executable, "-I", "-c", _STAY],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self.addCleanup(holder.wait)
            self.addCleanup(holder.stdin.close)
            self.assertEqual(holder.stdout.readline(), b"here\n")
        finally:
            os.kill(router.pid, signal.SIGCONT)
        reply = mallory.call("requestHeld", data=b64(lineRequest()))
        decoy.settle()
        self.assertEqual((decoy.count("accepted"), decoy.receivedBytes()), (0, 0))
        status, _, body = parseResponse(unb64(reply["head"]))
        self.assertEqual((status, json.loads(body)["uid"]), (200, attacker), router.evidence())

    def test_theOwnersContainerStillReachesTheOwner(self):
        """The proof works: a process of OWNER's container reaches OWNER's daemon."""
        router = self.harness.startRouter(["--subuid-file", self.subuid], wrapper=self.shim())
        self.harness.startBackend(OWNER_UID, "http")
        agent, hostUid = self.container()
        self.assertServedBy(self.ping(agent, router), OWNER_UID, router)
        self.assertEqual(router.logMatches("Linux 6.5"), [])

    def test_noProofWarnsOnceAtStart(self):
        """
        Without unix_diag either, nothing is proven: one warning at start
        says so, and a process of OWNER's container routes as its own uid.
        """
        router = self.harness.startRouter(["--subuid-file", self.subuid], wrapper=self.shim("-DNO_SOCK_DIAG"))
        router.waitLog(r"no SO_PEERPIDFD.*Linux 6\.5 or later proves it")
        self.harness.startBackend(OWNER_UID, "http")
        agent, hostUid = self.container()
        for _ in range(2):
            self.assertCleanHttpError(self.ping(agent, router), hostUid, self.harness.backendPath(hostUid))
        self.assertEqual(len(router.logMatches("no SO_PEERPIDFD")), 1)


def _state(pid):
    """A process's state letter (C{T}: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
