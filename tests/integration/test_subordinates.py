"""
Subordinate uids through the real router: only a process in a user namespace
owned by a range's owner reaches that owner's daemon (issue 12, finding 1);
uids of 2**31 and more are themselves (finding 3).

The ranges are in a --subuid-file of the test's own; the namespaces are real,
made by an agent running as the owner, mapped by root as newuidmap would.
"""

import os
import shutil
import unittest

from tests.integration.harness import UID_A, UID_B, IntegrationTestCase, unb64

START_A = 4_000_000
START_B = 4_100_000
COUNT = 65536


class SubordinateRoutingTests(IntegrationTestCase):
    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.subuid = os.path.join(self.harness.tmp, "subuid")
        with open(self.subuid, "w") as f:
            f.write(f"{UID_A}:{START_A}:{COUNT}\n{UID_B}:{START_B}:{COUNT}\n")
        self.router = self.harness.startRouter(["--subuid-file", self.subuid])

    def inNamespace(self, owner, start, containerUid=5):
        """
        An agent of C{owner} in a user namespace of its own that maps
        container uid 0 to C{owner} and 1... to C{start}..., running as
        C{containerUid}: host uid C{start + containerUid - 1}.
        """
        agent = self.harness.startAgent(owner)
        pid = agent.call("unshareUser")["pid"]
        for kind in ("uid", "gid"):
            with open(f"/proc/{pid}/{kind}_map", "w") as f:
                f.write(f"0 {owner} 1\n1 {start} {COUNT - 1}\n")
        agent.call("becomeIds", uid=containerUid, gid=containerUid)
        return agent, start + containerUid - 1

    def ping(self, agent):
        return agent.call("http", path=self.router.listenPath, method="GET", url="/_ping")

    def test_ownersContainerReachesTheOwner(self):
        """
        A process in a namespace of UID_A's, and one in a namespace nested
        inside it, reach UID_A's daemon.
        """
        self.harness.startBackend(UID_A, "http")
        agent, hostUid = self.inNamespace(UID_A, START_A)
        self.assertServedBy(self.ping(agent), UID_A, self.router)
        done = self.router.connectionDone(agent.ready["pid"])
        self.assertEqual((done["uid"], done["backend"]), (str(hostUid), self.harness.backendPath(UID_A)))
        agent.call("unshareUser")
        self.assertServedBy(self.ping(agent), UID_A, self.router)

    def test_withTheUnitsCapabilities(self):
        """
        The capabilities etc/docker-router.service keeps are enough to read
        a client's namespace (CAP_SYS_PTRACE); without CAP_SYS_PTRACE there
        is no proof, and the client is routed as itself.
        """
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise unittest.SkipTest("setpriv (util-linux) is needed to limit capabilities")
        self.harness.startBackend(UID_A, "http")
        for keep, served in (("+dac_override,+sys_ptrace", True), ("+dac_override", False)):
            router = self.harness.startRouter(
                ["--subuid-file", self.subuid],
                listenPath=os.path.join(self.harness.tmp, "caps%s.sock" % (served,)),
                wrapper=[setpriv, "--inh-caps=-all", "--bounding-set=-all," + keep, "--"],
            )
            agent, hostUid = self.inNamespace(UID_A, START_A)
            reply = agent.call("http", path=router.listenPath, method="GET", url="/_ping")
            if served:
                self.assertServedBy(reply, UID_A, router)
            else:
                self.assertCleanHttpError(reply, hostUid, self.harness.backendPath(hostUid))
                router.waitLog(r"cannot read the user namespace of clients .*CAP_SYS_PTRACE")

    def test_realAccountInsideARange(self):
        """
        A process of a real account whose uid is in UID_A's range, in the
        router's own namespace, is routed as itself: UID_A's daemon (a
        recording decoy) sees nothing.
        """
        decoy = self.harness.startDecoy(self.harness.backendPath(UID_A), uid=UID_A)
        mallory = START_A + 500
        self.harness.startBackend(mallory, "http")
        self.assertServedBy(self.get(mallory), mallory, self.router)
        decoy.settle()
        self.assertEqual((decoy.count("accepted"), decoy.receivedBytes()), (0, 0))

    def test_anotherUsersNamespaceMappingTheRange(self):
        """
        A namespace owned by UID_B that maps uids of UID_A's range (root
        wrote its map) goes nowhere near UID_A: the client is routed as the
        uid it runs as, where nothing listens.
        """
        decoy = self.harness.startDecoy(self.harness.backendPath(UID_A), uid=UID_A)
        agent, hostUid = self.inNamespace(UID_B, START_A)
        reply = self.ping(agent)
        self.assertCleanHttpError(reply, hostUid, self.harness.backendPath(hostUid))
        decoy.settle()
        self.assertEqual((decoy.count("accepted"), decoy.receivedBytes()), (0, 0))
        self.router.waitLog(r"rejected uid=%d .*cause=missing" % (hostUid,))

    def test_uidAbove2To31(self):
        """
        Finding 3: uid 3000000000 is logged and routed as itself, not as
        -1294967296.
        """
        big = 3_000_000_000
        self.harness.startBackend(big, "http")
        agent = self.harness.startAgent(big)
        reply = self.ping(agent)
        self.assertServedBy(reply, big, self.router)
        done = self.router.connectionDone(agent.ready["pid"])
        self.assertEqual((done["uid"], done["backend"]), (str(big), self.harness.backendPath(big)))
        self.assertNotIn("-1294967296", unb64(reply["body"]).decode() + self.router.log())
