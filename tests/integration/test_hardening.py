"""
Issue 5, hardening: one user cannot starve the others, the router survives
running out of descriptors, and a burst of docker CLIs all get in.

Each test drives the real router process with thousands of connections from
one client process (another uid), so the numbers are the kernel's, not a
mock's.  Timing is asserted where the issue asks for it (p99 of another
user's requests while one user holds 3,000 connections) and where "at once"
is the point (a 429, or another user's request, within a second or two:
far from any timeout that a wrong path would wait out).
"""

import json
import math
import os
import re
import resource
import time
import unittest

from dockerrouter.relay.limits import connectionsFor
from tests.integration.harness import (
    UID_A,
    UID_B,
    Deadline,
    IntegrationTestCase,
    b64,
    lineRequest,
    parseResponse,
    pollUntil,
    unb64,
)

REQUEST = lineRequest()
TOO_MANY = r"rejected uid=%d .*cause=too-many$"
EMFILE_WARNING = "out of file descriptors"


def figure(name, value):
    """
    Report a measured figure on stderr when DOCKER_ROUTER_FIGURES is set
    (the tests assert on them; this is for people reading a run).
    """
    if os.environ.get("DOCKER_ROUTER_FIGURES"):
        import sys

        sys.stderr.write("\nFIGURE %s = %s\n" % (name, value))


def percentile(values, fraction):
    """
    The nearest-rank percentile: the smallest value at least C{fraction} of
    the values are no greater than.
    """
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def needDescriptors(count):
    """
    Skip when this machine's hard open-file limit can't hold C{count}
    sockets in one client process.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < count + 100:
        raise unittest.SkipTest("hard RLIMIT_NOFILE %d is below %d" % (hard, count + 100))


class HardeningTestCase(IntegrationTestCase):
    def hold(self, agent, router, count, **kwargs):
        """
        Have C{agent} open and keep C{count} relayed connections (each
        proved by an echoed byte).
        """
        held = agent.call("holdMany", seconds=300, path=router.listenPath, count=count, **kwargs)
        self.assertEqual(held["connects"], {"ok": count}, "%r\n%s" % (held, router.evidence()))
        self.assertEqual(held["echoed"], count, "%r\n%s" % (held, router.evidence()))
        return held

    def echoOnce(self, uid, router, payload=REQUEST):
        """
        One exchange by a fresh client of C{uid}: the raw answer.
        """
        agent = self.harness.startAgent(uid)
        reply = agent.call("raw", path=router.listenPath, data=b64(payload), shutdown=True)
        return reply, unb64(reply["head"])

    def assertTooMany(self, reply, raw, uid, limit, router):
        """
        An answer is the router's immediate 429 naming the limit, read to a
        clean EOF.
        """
        self.assertEqual(reply["error"], None, "%r\n%s" % (reply, router.evidence()))
        status, headers, body = parseResponse(raw)
        self.assertEqual(status, 429, "%r\n%s" % (raw[:500], router.evidence()))
        self.assertTrue(raw.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), raw[:200])
        self.assertIn("application/json", headers.get("content-type", ""))
        self.assertEqual(headers.get("connection", "").lower(), "close")
        message = json.loads(body)["message"]
        self.assertTrue(re.search(r"\b%d\b" % (limit,), message), message)
        self.assertTrue(re.search(r"\b%d\b" % (uid,), message), message)
        # "At once": not after a connect timeout (5 s) or a read timeout.
        self.assertLess(reply["elapsed"], 1.0, reply)
        return message


class FairnessTests(HardeningTestCase):
    """
    One user's connections don't cost another user's requests.
    """

    def test_idleConnectionsDoNotSlowOthers(self):
        """
        With 3,000 idle connections of one uid relayed, 200 sequential
        requests of another uid (each a new connection) all succeed with a
        p99 under 50 ms.
        """
        needDescriptors(3000)
        router = self.harness.startRouter(args=["--max-connections-per-user", "4000"])
        self.harness.startBackend(UID_A, "selectEcho")
        self.harness.startBackend(UID_B, "http")
        self.hold(self.harness.startAgent(UID_A), router, 3000)
        loop = self.harness.startAgent(UID_B).call(
            "latencyLoop", seconds=120, path=router.listenPath, data=b64(REQUEST), count=200
        )
        self.assertEqual(loop["errors"], {}, loop["errors"])
        self.assertEqual(loop["statuses"], {"HTTP/1.1 200 OK": 200}, router.evidence())
        p50 = percentile(loop["times"], 0.50)
        p99 = percentile(loop["times"], 0.99)
        figure("fairness p50 ms", "%.2f" % (p50 * 1000,))
        figure("fairness p99 ms", "%.2f" % (p99 * 1000,))
        figure("fairness max ms", "%.2f" % (max(loop["times"]) * 1000,))
        self.assertLess(p99, 0.050, "p99 %.1f ms (p50 %.1f ms)" % (p99 * 1000, p50 * 1000))
        # Still all there: a cap or a timeout did not quietly drop them.
        self.assertIsNone(router.process.poll())
        self.assertGreaterEqual(router.descriptors().get("socket", 0), 6000)

    def test_perUserCap(self):
        """
        Over C{--max-connections-per-user 3}, the 4th connection of one uid
        gets a 429 naming the limit at once; another uid is unaffected; when
        one closes, a new one is relayed again.
        """
        router = self.harness.startRouter(args=["--max-connections-per-user", "3"])
        self.harness.startBackend(UID_A, "echo")
        self.harness.startBackend(UID_B, "http")
        holder = self.harness.startAgent(UID_A)
        self.hold(holder, router, 3)

        reply, raw = self.echoOnce(UID_A, router)
        message = self.assertTooMany(reply, raw, UID_A, 3, router)
        router.waitLog(TOO_MANY % (UID_A,))
        self.assertIn("3", message)

        self.assertServedBy(self.get(UID_B, router=router), UID_B, router)

        holder.call("closeHeld", count=1)
        # The router hears of the close a moment later: poll for the relay.
        def relayed():
            reply, raw = self.echoOnce(UID_A, router)
            return raw == REQUEST and reply["error"] is None

        pollUntil(relayed, 10, interval=0.05, what="a relayed connection after closing one")
        self.assertIsNone(router.process.poll())

    def test_totalCap(self):
        """
        Over C{--max-connections 3} (all users together), the next client,
        whoever it is, gets a 429 naming the limit; closing one lets the next
        one in.
        """
        router = self.harness.startRouter(args=["--max-connections", "3"])
        self.harness.startBackend(UID_A, "echo")
        self.harness.startBackend(UID_B, "echo")
        holderA = self.harness.startAgent(UID_A)
        self.hold(holderA, router, 2)
        self.hold(self.harness.startAgent(UID_B), router, 1)

        reply, raw = self.echoOnce(UID_B, router)
        self.assertTooMany(reply, raw, UID_B, 3, router)
        router.waitLog(TOO_MANY % (UID_B,))

        holderA.call("closeHeld", count=1)

        def relayed():
            reply, raw = self.echoOnce(UID_B, router)
            return raw == REQUEST and reply["error"] is None

        pollUntil(relayed, 10, interval=0.05, what="a relayed connection after closing one")


    def test_silentClientsOverTheCapDoNotLockOutOthers(self):
        """
        A user over C{--max-connections-per-user 3} who keeps 400 more
        connections open without sending a byte, against a router with 256
        descriptors: another user's request is still served, at once.  (The
        over-cap connections must cost neither the total cap nor the
        descriptors for long.)
        """
        router = self.harness.startRouter(
            args=["--max-connections-per-user", "3"],
            wrapper=["prlimit", "--nofile=256:256", "--"],
        )
        self.harness.startBackend(UID_A, "selectEcho")
        self.harness.startBackend(UID_B, "http")
        crowd = self.harness.startAgent(UID_A)
        opened = crowd.call(
            "holdMany", seconds=60, path=router.listenPath, count=400, nonblocking=True, probe=False
        )
        self.assertEqual(opened["connects"], {"ok": 400}, opened)
        router.waitLog(TOO_MANY % (UID_A,))
        reply = self.harness.startAgent(UID_B).call(
            "http", path=router.listenPath, method="GET", url="/_ping", timeout=30
        )
        body = unb64(reply.get("body", "")).decode("utf-8", "replace")
        figure("other user's request beside 400 silent over-cap clients", "%s %.3fs %s" % (
            reply.get("status"), reply["elapsed"], body[:200]))
        self.assertEqual(reply.get("status"), 200, "%r %s\n%s" % (reply, body, router.evidence()))
        self.assertLess(reply["elapsed"], 2.0, reply)


class DescriptorTests(HardeningTestCase):
    """
    The router under a small open-file limit: more clients than descriptors.
    """

    LIMIT = 256
    CLIENTS = 400

    def startSmallRouter(self, args=()):
        router = self.harness.startRouter(
            args=list(args),
            wrapper=["prlimit", "--nofile=%d:%d" % (self.LIMIT, self.LIMIT), "--"],
        )
        router.waitLog(r"open file limit: (raised from \d+ to )?%d\b" % (self.LIMIT,))
        return router

    def crowdIn(self, crowd, router):
        """
        C{CLIENTS} non-blocking connects from C{crowd} at once, all held
        without a byte sent: more than the router has descriptors for.
        """
        opened = crowd.call(
            "holdMany",
            seconds=60,
            path=router.listenPath,
            count=self.CLIENTS,
            nonblocking=True,
            probe=False,
        )
        self.assertEqual(opened["connects"], {"ok": self.CLIENTS}, opened)

    def emfileLines(self, router):
        """
        (our back-off warnings, any line at all that mentions running out)
        """
        lines = router.log().splitlines()
        warnings = [l for l in lines if EMFILE_WARNING in l]
        mentions = [l for l in lines if re.search(r"EMFILE|ENFILE|Too many open files", l)]
        return warnings, mentions

    def test_moreClientsThanDescriptors(self):
        """
        With caps out of the way (so accept itself meets EMFILE), 400 clients
        at once under a 256 descriptor limit: the router stays up, logs one
        warning per back-off (not a flood), keeps an existing relay working
        throughout, and serves new clients normally once they are gone.
        """
        router = self.startSmallRouter(
            ["--max-connections", "100000", "--max-connections-per-user", "100000"]
        )
        self.harness.startBackend(UID_A, "selectEcho")
        self.harness.startBackend(UID_B, "echo")
        live = self.harness.startEchoLoop(UID_B, router.listenPath)
        baseline = live.last("progress", "ok", 0)

        crowd = self.harness.startAgent(UID_A)
        started = time.monotonic()
        self.crowdIn(crowd, router)
        router.waitLog(EMFILE_WARNING, seconds=20)
        # Watch the router at its limit for a while: the live relay must
        # keep going, and the warnings must not pile up.
        window = Deadline(2.0)
        while not window.expired():
            self.assertIsNone(live.process.poll(), live.stderr())
            live.pump(0.1)
        progressed = live.waitEvent("progress", 10, len(live.events))[1]["ok"]
        self.assertGreater(progressed, baseline)
        self.assertEqual(live.count("failed"), 0, live.events[-3:])
        crowd.call("closeHeld")
        held = time.monotonic() - started

        warnings, mentions = self.emfileLines(router)
        figure("EMFILE warnings", "%d in %.1fs held (%d lines mention EMFILE)" % (
            len(warnings), held, len(mentions)))
        self.assertIsNone(router.process.poll(), router.evidence())
        self.assertGreaterEqual(len(warnings), 1)
        # One per 0.5 s back-off at most, and a little slack.
        self.assertLessEqual(len(warnings), held / 0.5 + 3, "\n".join(warnings[:20]))
        self.assertLessEqual(len(mentions), len(warnings) + 3, "\n".join(mentions[:20]))
        self.assertNotIn("Traceback", router.log())

        def served():
            reply, raw = self.echoOnce(UID_A, router)
            return raw == REQUEST and reply["error"] is None

        pollUntil(served, 20, interval=0.1, what="a relayed request after the crowd left")
        self.assertEqual(live.count("failed"), 0, live.events[-3:])
        self.assertIsNone(router.process.poll(), router.evidence())

    def test_defaultCapUnderSmallLimit(self):
        """
        With the default caps, derived from the descriptor limit, 400 clients
        at once under a 256 limit: the router stays up, and every client gets
        an answer: relayed (its request echoed), a 429 naming the total
        limit or a 503 saying it is out of descriptors, those in the listen backlog once the router has descriptors
        again (its back-off); afterwards it serves normally.
        """
        router = self.startSmallRouter()
        self.harness.startBackend(UID_A, "selectEcho")
        crowd = self.harness.startAgent(UID_A)
        self.crowdIn(crowd, router)
        router.waitLog(TOO_MANY % (UID_A,) + "|" + EMFILE_WARNING, seconds=20)
        answered = crowd.call("exchangeHeld", seconds=120, data=b64(REQUEST))
        figure("answers with default caps", json.dumps(answered))
        self.assertEqual(answered["unanswered"], 0, "%r\n%s" % (answered, router.evidence()))
        answers = answered["answers"]
        self.assertEqual(sum(answers.values()), self.CLIENTS, answered)
        # Idle relays cost two descriptors, so the default cap admits more
        # than the old six did; a client over the total cap keeps its socket
        # uncounted for the second its 429 drains (so that its CLI reads the
        # answer), and an admitted one that then finds no descriptor left to
        # reach its daemon is told so (503, router-busy).
        self.assertLessEqual(set(answers), {"echo", "HTTP/1.1 429 Too Many Requests", "HTTP/1.1 503 Service Unavailable"}, "%r\n%s" % (answered, "\n".join(l for l in router.log().splitlines() if ("cause=" in l and "too-many" not in l) or "out of file" in l or "refused" in l)))
        self.assertGreater(answers.get("HTTP/1.1 429 Too Many Requests", 0), 0, answered)
        limit = "limit of %d connections" % (connectionsFor(self.LIMIT),)
        for sample in answered["samples"]:
            self.assertIn(limit, sample)
        warnings, mentions = self.emfileLines(router)
        figure("EMFILE warnings with default caps", "%d (%d mention EMFILE)" % (
            len(warnings), len(mentions)))
        self.assertIsNone(router.process.poll(), router.evidence())

        def served():
            reply, raw = self.echoOnce(UID_A, router)
            return raw == REQUEST and reply["error"] is None

        pollUntil(served, 20, interval=0.1, what="a relayed request after the crowd left")
        self.assertNotIn("Traceback", router.log())


class BurstTests(HardeningTestCase):
    """
    Many docker CLIs at the same moment.
    """

    def test_thousandNonBlockingConnects(self):
        """
        1,000 non-blocking connects at once (a docker CLI gets EAGAIN when the
        backlog is full): none gets EAGAIN, and every one is relayed and
        answered.
        """
        needDescriptors(1000)
        router = self.harness.startRouter()
        self.harness.startBackend(UID_A, "selectEcho")
        burst = self.harness.startAgent(UID_A).call(
            "burst", seconds=120, path=router.listenPath, count=1000, data=b64(REQUEST)
        )
        figure("burst", json.dumps(burst))
        self.assertEqual(burst["connects"], {"ok": 1000}, burst)
        self.assertEqual(burst["errors"], {}, burst)
        self.assertEqual(burst["unanswered"], 0, "%r\n%s" % (burst, router.evidence()))
        self.assertEqual(burst["answers"], {"echo": 1000}, burst)
        self.assertIsNone(router.process.poll())
