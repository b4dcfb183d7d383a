"""
The relay is transparent: large transfers, half-close both ways, bounded
memory, and one side's death ends the other.
"""

import time

from tests.integration import children
from tests.integration.harness import UID_A, UID_B, IntegrationTestCase, pollUntil, unb64

MiB = 1 << 20


def memAvailable():
    """The kernel's MemAvailable, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


class TransferTests(IntegrationTestCase):
    """
    64 MiB each way, with checksums computed at the far end.
    """

    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.router = self.harness.startRouter()

    def test_upload(self):
        """
        64 MiB from the client: the backend's own count and sha256 match.
        """
        self.harness.startBackend(UID_A, "countThenReply")
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=self.router.listenPath)
        sent = agent.call("sendPattern", seed=1, size=64 * MiB)
        agent.call("shutdownWrite")
        received = agent.call("recvAll")
        self.assertEqual((sent["error"], received["error"]), (None, None), self.router.evidence())
        self.assertEqual(unb64(received["head"]), b"%d %s\n" % (64 * MiB, sent["sha"].encode()))

    def test_download(self):
        """
        64 MiB from the backend arrive unchanged and in order.
        """
        self.harness.startBackend(UID_A, "source", seed=2, size=64 * MiB)
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=self.router.listenPath)
        received = agent.call("recvAll")
        self.assertEqual(received["error"], None, self.router.evidence())
        expected = (64 * MiB, children.patternDigest(2, 64 * MiB))
        self.assertEqual((received["len"], received["sha"]), expected)

    def test_bothWaysAtOnce(self):
        """
        64 MiB echoed back while still sending (both directions busy at once),
        and the log counts them.
        """
        self.harness.startBackend(UID_A, "echo")
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=self.router.listenPath)
        result = agent.call("echoTransfer", seed=3, size=64 * MiB)
        sent, received = result["sent"], result["received"]
        self.assertEqual((sent["error"], received["error"]), (None, None), result)
        self.assertEqual((received["len"], received["sha"]), (64 * MiB, sent["sha"]))
        done = self.router.connectionDone(agent.ready["pid"])
        self.assertEqual((done["to_docker"], done["from_docker"]), (str(64 * MiB), str(64 * MiB)))


class HalfCloseTests(IntegrationTestCase):
    """
    A half-close is passed on, and the other direction keeps flowing.
    """

    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.router = self.harness.startRouter()

    def test_clientHalfClose(self):
        """
        The client's shutdown(SHUT_WR) reaches the backend as EOF, and the
        backend's reply (written only after that EOF) still comes back whole
        (C{echo abc | docker run -i IMG wc -c}).
        """
        self.harness.startBackend(UID_A, "countThenReply", seed=4, replySize=8 * MiB)
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=self.router.listenPath)
        sent = agent.call("sendPattern", seed=5, size=3 * MiB)
        agent.call("shutdownWrite")
        received = agent.call("recvAll", keep=200)
        self.assertEqual(received["error"], None, self.router.evidence())
        header = b"%d %s\n" % (3 * MiB, sent["sha"].encode())
        self.assertEqual(unb64(received["head"])[: len(header)], header)
        self.assertEqual(received["len"], len(header) + 8 * MiB)

    def test_backendHalfClose(self):
        """
        The backend's shutdown(SHUT_WR) reaches the client as EOF, and the
        client can go on sending: all of it reaches the backend.
        """
        backend = self.harness.startBackend(UID_A, "greetThenCount", seed=6, greetSize=MiB)
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=self.router.listenPath)
        greeting = agent.call("recvAll", keep=0)
        expected = (MiB, children.patternDigest(6, MiB))
        self.assertEqual((greeting["len"], greeting["sha"]), expected, greeting)
        sent = agent.call("sendPattern", seed=7, size=8 * MiB)
        failed = "sending after the backend's EOF failed\n" + self.router.evidence()
        self.assertEqual(sent["error"], None, failed)
        agent.call("shutdownWrite")
        _, received = backend.waitEvent("received")
        self.assertEqual((received["bytes"], received["sha"]), (8 * MiB, sent["sha"]))
        done = self.router.connectionDone(agent.ready["pid"])
        self.assertEqual((done["to_docker"], done["from_docker"]), (str(8 * MiB), str(MiB)))


class BackpressureTests(IntegrationTestCase):
    """
    Memory stays bounded whatever the speeds.
    """

    def test_slowReaderKeepsRouterMemorySmall(self):
        """
        A backend streams 256 MiB as fast as it can; the client reads a little,
        slowly, then stops.  Backpressure must reach the backend (it stalls
        far short of 256 MiB) and the router's RSS must stay near its baseline.
        """
        router = self.harness.startRouter()
        # Warm up: the first relay imports and allocates what every relay needs.
        self.harness.startBackend(UID_B, "http")
        self.assertServedBy(self.get(UID_B), UID_B, router)
        baseline = router.rss()

        backend = self.harness.startBackend(UID_A, "source", size=256 * MiB)
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=router.listenPath)
        self.assertEqual(agent.call("recvSlowly", size=MiB)["len"], MiB)

        # Wait for the stream to stall: no progress for a whole second.
        progress = {"bytes": -1, "since": time.monotonic()}

        def stalled():
            sent = backend.last("sent", "bytes", 0)
            now = time.monotonic()
            if sent != progress["bytes"]:
                progress.update(bytes=sent, since=now)
            return now - progress["since"] >= 1.0

        pollUntil(stalled, 30, interval=0.1, what="the backend to stall")
        peak = max(router.rss() for _ in range(5))
        self.assertLess(progress["bytes"], 32 * MiB, "backpressure did not reach the backend")
        self.assertLess(
            peak - baseline,
            8 * MiB,
            "router RSS grew from %d to %d bytes while the backend had sent %d"
            % (baseline, peak, progress["bytes"]),
        )


class StalledReaderTests(IntegrationTestCase):
    """
    Kernel memory in flight is bounded per user, whoever reads how slowly.
    """

    def test_stalledReadersOfOneUserPinLittle(self):
        """
        1024 connections of one user to a daemon that sends for ever, none of
        them read: what the router holds, and what the host loses, stay far
        below the gigabytes that 1 MiB pipes and grown buffers per connection
        would pin (over 2 GiB each before the budget; the host's bound is
        generous, the host is shared), and another user's download still
        goes through whole.
        """
        router = self.harness.startRouter()
        self.harness.startBackend(UID_A, "selectFlood")
        self.harness.startBackend(UID_B, "source", seed=8, size=64 * MiB)
        stalled = self.harness.startAgent(UID_A)
        other = self.harness.startAgent(UID_B)
        before = memAvailable()
        held = stalled.call("holdMany", path=router.listenPath, count=1024, probe=False)
        self.assertEqual(held["connects"], {"ok": 1024}, router.evidence())

        # Wait for the streams to fill whatever they may: the router's count
        # standing still (MemAvailable is the whole host's, and never still).
        samples = []

        def settled():
            samples.append(router.inFlight())
            return len(samples) >= 3 and len(set(samples[-3:])) == 1 and samples[-1] > 0

        pollUntil(settled, 120, interval=0.5, what="the stalled streams to fill")
        fallen = before - memAvailable()
        self.assertLess(fallen, 768 * MiB, "MemAvailable fell by %d MiB" % (fallen // MiB,))
        # The router's own part, exactly: a small read per stalled connection
        # and the user's share of big pipes and buffers (2 GiB without them).
        self.assertLess(samples[-1], 96 * MiB, "the router holds %d MiB" % (samples[-1] // MiB,))

        other.call("connect", path=router.listenPath)
        received = other.call("recvAll", keep=0)
        self.assertEqual(received["error"], None, router.evidence())
        expected = (64 * MiB, children.patternDigest(8, 64 * MiB))
        self.assertEqual((received["len"], received["sha"]), expected)
        self.assertEqual(router.process.poll(), None)


class DeathTests(IntegrationTestCase):
    """
    A reset or death on one side ends the other promptly.
    """

    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.router = self.harness.startRouter()

    def test_backendDeathEndsClient(self):
        """
        kill -9 of the daemon mid-session ends the client's connection.
        """
        backend = self.harness.startBackend(UID_A, "echo")
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=self.router.listenPath)
        agent.call("send", data="cGluZw==")
        self.assertEqual(agent.call("recvExact", size=4)["data"], "cGluZw==")
        backend.kill()
        started = time.monotonic()
        ended = agent.call("recvAll", seconds=10, timeout=8)
        self.assertNotEqual(ended["error"], "timeout", self.router.evidence())
        self.assertLess(time.monotonic() - started, 3)

    def test_clientDeathEndsBackend(self):
        """
        kill -9 of the client mid-session ends the daemon's connection, and
        the relay is logged.
        """
        backend = self.harness.startDecoy(self.harness.backendPath(UID_A), uid=UID_A)
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=self.router.listenPath)
        agent.call("send", data="cGluZw==")
        pollUntil(lambda: backend.receivedBytes() == 4, 10, what="the backend to get 4 bytes")
        agent.kill()
        backend.waitEvent("closed", 3)
        self.router.connectionDone(agent.ready["pid"])


class LastWordsTests(IntegrationTestCase):
    """
    A daemon that stops reading, writes its last output and closes while the
    client keeps sending and reads slowly (an attached C{run -i} whose
    program exits while stdin still flows): the client gets every byte, as
    it does talking to the daemon directly.
    """

    SIZE = 736_000
    RUNS = 20

    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.router = self.harness.startRouter()

    def test_everyByteArrives(self):
        backend = self.harness.startBackend(UID_A, "lastWords", seed=4, size=self.SIZE)
        agent = self.harness.startAgent(UID_A)
        expected = children.patternDigest(4, self.SIZE)
        outcomes = {}
        for name, path in (("direct", backend.path), ("router", self.router.listenPath)):
            runs = [agent.call("sendWhileReading", path=path) for _ in range(self.RUNS)]
            outcomes[name] = {
                "whole": sum((r["len"], r["sha"]) == (self.SIZE, expected) for r in runs),
                "lost": sum(self.SIZE - r["len"] for r in runs),
                "sendErrors": sorted({r["sendError"] for r in runs}),
            }
        self.assertEqual(outcomes["direct"]["whole"], self.RUNS, outcomes)
        self.assertEqual((outcomes["router"]["whole"], outcomes["router"]["lost"]), (self.RUNS, 0), outcomes)
        # The client learns that the daemon is gone from its sends, as direct.
        self.assertNotIn(None, outcomes["router"]["sendErrors"], outcomes)
        done = self.router.connectionDone(agent.ready["pid"])
        self.assertEqual(done["from_docker"], str(self.SIZE))
        self.assertTrue(done["end"].startswith("docker:"), done)
