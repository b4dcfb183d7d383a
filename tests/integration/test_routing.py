"""
Routing by the client's uid, through the real router process.
"""

import os

from tests.integration import children
from tests.integration.harness import NOBODY, UID_A, UID_B, IntegrationTestCase, b64, unb64


class RoutingTests(IntegrationTestCase):
    """
    Each uid reaches its own backend and nobody else's.
    """

    def test_eachUidReachesItsOwnBackend(self):
        """
        Two uids connecting to the same socket are answered by two different
        backends, each running as the uid that connected.
        """
        router = self.harness.startRouter()
        self.harness.startBackend(UID_A, "http")
        self.harness.startBackend(UID_B, "http")
        for uid in (UID_A, UID_B, UID_A):
            self.assertServedBy(self.get(uid), uid, router)

    def test_namedUserTemplate(self):
        """
        C{{user}} in the template is filled from the user database, and the log
        names the user.
        """
        template = os.path.join(self.harness.backends, "{user}-{uid}.sock")
        router = self.harness.startRouter(template=template)
        path = os.path.join(self.harness.backends, "nobody-65534.sock")
        self.harness.startBackend(NOBODY, "http", path)
        agent = self.harness.startAgent(NOBODY)
        reply = agent.call("http", path=router.listenPath, method="GET", url="/_ping")
        self.assertServedBy(reply, NOBODY, router)
        done = router.connectionDone(agent.ready["pid"])
        self.assertEqual(
            (done["uid"], done["user"], done["backend"]), (str(NOBODY), "nobody", path)
        )

    def test_symlinkToOwnBackendWorks(self):
        """
        A user may point their path at their own daemon elsewhere (like
        C{~/.docker/run/docker.sock}).
        """
        router = self.harness.startRouter()
        real = os.path.join(self.harness.userDirectory(UID_A), "docker.sock")
        self.harness.startBackend(UID_A, "http", real)
        self.harness.symlink(real, self.harness.backendPath(UID_A), owner=UID_A)
        self.assertServedBy(self.get(UID_A), UID_A, router)

    def test_bytesSentBeforeTheBackendIsConnectedAreKept(self):
        """
        A client that writes (and even half-closes) the moment connect returns,
        before the router has reached the backend, loses nothing.
        """
        router = self.harness.startRouter()
        self.harness.startBackend(UID_A, "echo")
        agent = self.harness.startAgent(UID_A)
        for seed in range(10):
            data = b"".join(children.pattern(seed, 100_000 + seed))
            agent.call("connectAndSend", path=router.listenPath, data=b64(data), shutdown=True)
            received = agent.call("recvAll", keep=len(data) + 1)
            agent.call("close")
            self.assertEqual(received["error"], None, router.evidence())
            self.assertEqual(
                unb64(received["head"]), data, "seed %d\n%s" % (seed, router.evidence())
            )

    def test_logRecordCountsTheBytes(self):
        """
        The C{connection done} record carries the true byte counts each way,
        the client's pid and the backend path.
        """
        router = self.harness.startRouter()
        backend = self.harness.startBackend(UID_A, "countThenReply", seed=7, replySize=654_321)
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=router.listenPath)
        sent = agent.call("sendPattern", seed=3, size=1_234_567)
        agent.call("shutdownWrite")
        received = agent.call("recvAll")
        self.assertEqual((sent["error"], received["error"]), (None, None))
        done = router.connectionDone(agent.ready["pid"])
        self.assertEqual(
            (done["uid"], done["backend"], done["to_docker"], done["from_docker"]),
            (str(UID_A), backend.path, str(sent["sent"]), str(received["len"])),
            router.evidence(),
        )
        self.assertEqual(sent["sent"], 1_234_567)
        self.assertGreater(received["len"], 654_321)
