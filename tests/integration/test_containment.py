"""
Issue 18, item 3: no connection outlives its failure.

A failure inside one connection (a link swapped under the router's look, a
flood of refused clients, a slow client of the metrics site) ends that
connection and costs nobody else: the user's count goes back to 0, the
router's descriptors to where they were, and another user's requests and
scrapes are served.
"""

import json
import os
import time

from dockerrouter.cli import getUnix

from tests.integration.harness import (
    UID_A,
    UID_B,
    Child,
    Deadline,
    IntegrationTestCase,
    b64,
    lineRequest,
    pollUntil,
)
from tests.integration.test_hardening import figure, needDescriptors, percentile

REQUEST = lineRequest()


class ContainmentTestCase(IntegrationTestCase):
    def startChild(self, role, uid=None, **conf):
        child = Child(self.harness, self.harness._name(role), dict(role=role, **conf), uid)
        child.waitReady()
        return child

    def status(self, path):
        response, body = getUnix(path, "/status")
        self.assertEqual(response.status, 200, body)
        return json.loads(body)

    def descriptorCount(self, router):
        return sum(router.descriptors().values())


class LinkSwapTests(ContainmentTestCase):
    def test_linkSwappedWhileTheBacklogIsFull(self):
        """
        For 30 s, a user's socket path trades places (renameat2
        RENAME_EXCHANGE) between a link to their daemon, whose listen
        backlog is full, and a plain file, while the user keeps 30
        connections waiting for it: afterwards the user holds no
        connection and the router no descriptor more than before.
        """
        control = os.path.join(self.harness.tmp, "control.sock")
        router = self.harness.startRouter(
            args=[
                "--control", "unix:%s:mode=600" % (control,),
                "--max-connections-per-user", "30",
                "--connect-timeout", "1",
            ]
        )
        full = os.path.join(self.harness.backends, "full-%d.sock" % (UID_A,))
        self.harness.startBackend(UID_A, "backlogFull", full)
        link = self.harness.backendPath(UID_A)
        plain = os.path.join(self.harness.backends, "plain-%d" % (UID_A,))
        with open(plain, "w") as f:
            f.write("not a socket\n")
        self.harness.symlink(full, link)
        pollUntil(lambda: self.status(control)["users"] == [], 10, what="an idle router")
        before = self.descriptorCount(router)

        exchanger = self.startChild("exchanger", paths=[link, plain])
        agent = self.harness.startAgent(UID_A)
        answers = {}
        deadline = Deadline(30)
        while not deadline.expired():
            burst = agent.call("burst", seconds=60, path=router.listenPath, count=30, data=b64(REQUEST), timeout=20)
            self.assertEqual(burst["unanswered"], 0, "%r\n%s" % (burst, router.evidence()))
            for kind, count in burst["answers"].items():
                answers[kind] = answers.get(kind, 0) + count
        exchanger.kill()
        figure("answers while the link was swapped", json.dumps(answers))
        # Both sides of the race were met.
        self.assertGreater(sum(answers.values()), 30, answers)

        pollUntil(lambda: self.status(control)["users"] == [], 10, what="the user's count back at 0")
        pollUntil(
            lambda: self.descriptorCount(router) <= before,
            10,
            what="the router's descriptors back to %d (%r)" % (before, router.descriptors()),
        )
        # Not left at its cap: a new connection is still answered as usual.
        burst = agent.call("burst", seconds=60, path=router.listenPath, count=30, data=b64(REQUEST), timeout=20)
        self.assertEqual(burst["unanswered"], 0, burst)
        self.assertNotIn("HTTP/1.1 429 Too Many Requests", burst["answers"], burst)
        self.assertIsNone(router.process.poll(), router.evidence())


class RefusalFloodTests(ContainmentTestCase):
    def test_deniedUsersSilentFlood(self):
        """
        A denied user opens 5,000 connections and sends nothing, against a
        router with 1,024 descriptors: another user's requests, made
        meanwhile, are all served, each within a second.
        """
        needDescriptors(5000)
        config = os.path.join(self.harness.tmp, "router.toml")
        with open(config, "w") as f:
            f.write('[[rule]]\nuid = %d\ndeny = "Docker is off for you."\n' % (UID_A,))
        router = self.harness.startRouter(
            args=["--config", config], wrapper=["prlimit", "--nofile=1024:1024", "--"]
        )
        router.waitLog(r"open file limit: (raised from \d+ to )?1024\b")
        self.harness.startBackend(UID_B, "http")
        crowd = self.harness.startAgent(UID_A)
        other = self.harness.startAgent(UID_B)
        # As fast as the router takes them (a full backlog is EAGAIN).
        held = 0
        deadline = Deadline(120)
        while held < 5000 and not deadline.expired():
            held = crowd.call(
                "holdMany", path=router.listenPath, count=5000 - held, nonblocking=True, probe=False
            )["held"]
        self.assertEqual(held, 5000)
        loop = other.call("latencyLoop", seconds=120, path=router.listenPath, data=b64(REQUEST), count=100)
        figure("another user's requests beside 5,000 denied silent clients", "p50 %.3fs max %.3fs" % (
            percentile(loop["times"], 0.5), max(loop["times"])))
        self.assertEqual(loop["errors"], {}, "%r\n%s" % (loop["errors"], router.evidence()))
        self.assertEqual(loop["statuses"], {"HTTP/1.1 200 OK": 100}, router.evidence())
        self.assertLess(max(loop["times"]), 1.0, loop["times"])
        self.assertIsNone(router.process.poll(), router.evidence())


class MetricsSiteTests(ContainmentTestCase):
    def test_tricklingClientsDoNotStopAScrape(self):
        """
        One user holds 64 connections to the metrics socket, each sending a
        byte of a request head every 20 s: another uid's scrape is served
        at once, and the trickling connections are closed by their request
        deadline.
        """
        metrics = os.path.join(self.harness.tmp, "metrics.sock")
        router = self.harness.startRouter(args=["--metrics", "unix:%s:mode=666" % (metrics,)])
        trickler = self.startChild("trickler", UID_A, path=metrics, count=64, interval=20)
        started = time.monotonic()
        scraper = self.harness.startAgent(UID_B)
        reply = scraper.call(
            "http", path=metrics, method="GET", url="/metrics", headers={"Connection": "close"}, timeout=10
        )
        self.assertEqual(reply.get("status"), 200, "%r\n%s" % (reply, router.evidence()))
        self.assertLess(reply["elapsed"], 1.0, reply)
        # The request deadline ends the rest well before the 60 s idle timeout.
        index, event = trickler.waitEvent("progress", 40, start=2)
        self.assertEqual(event["closed"], 64, (event, time.monotonic() - started))
