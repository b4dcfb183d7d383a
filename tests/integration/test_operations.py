"""
Issue 10, operating the router: its metrics checked against what really
happened, the refusal log under a flood, the status command, and reload.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from dockerrouter.cli import getUnix

from tests.integration.harness import (
    UID_A,
    UID_B,
    IntegrationTestCase,
    b64,
    lineRequest,
    parseResponse,
    pollUntil,
    unb64,
)

KiB = 1024


def scrape(path):
    """
    C{GET /metrics} from the router's metrics socket: a dict of
    C{(name, frozenset(labels.items()))} to value.
    """
    response, body = getUnix(path, "/metrics")
    assert response.status == 200, body[:300]
    assert response.getheader("content-type").startswith("text/plain"), response.getheaders()
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def one(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


class MetricsTestCase(IntegrationTestCase):
    def startRouter(self, *args, ready=True):
        """
        A router serving metrics.  (Its readiness probe, a connection as
        root, is refused as C{missing}.)
        """
        self.metricsPath = os.path.join(self.harness.tmp, "metrics.sock")
        return self.harness.startRouter(
            args=["--metrics", "unix:%s:mode=600" % (self.metricsPath,)] + list(args),
            ready=ready,
        )

    def scrape(self):
        return scrape(self.metricsPath)


class MetricsTests(MetricsTestCase):
    def test_missingSystemdSocketIsAWarning(self):
        """
        A metrics socket systemd did not hand over (its unit stopped or not
        installed) costs a warning, never Docker: the router starts and
        serves.
        """
        router = self.harness.startRouter(args=["--metrics", "systemd:domain=INET:name=metrics"])
        router.waitLog(r"not serving metrics on systemd:domain=INET:name=metrics: "
                       r"systemd handed over no such socket$")
        self.assertIsNone(router.process.poll(), router.evidence())

    def test_everySeriesFromTheStart(self):
        """
        Before any connection, every series is there, at zero.
        """
        self.startRouter(ready=False)
        pollUntil(lambda: os.path.exists(self.metricsPath), 20, what="the metrics socket")
        samples = self.scrape()
        for result in ("relayed", "missing", "refused", "not_a_socket", "wrong_owner", "loop",
                       "timeout", "permission", "too_many", "router_busy", "unusable"):
            self.assertEqual(one(samples, "docker_router_connections_total", result=result), 0, result)
        for direction in ("to_docker", "from_docker"):
            self.assertEqual(one(samples, "docker_router_bytes_total", direction=direction), 0)
        for result in ("ok", "error"):
            self.assertEqual(one(samples, "docker_router_reloads_total", result=result), 0)
        self.assertEqual(one(samples, "docker_router_connections_active"), 0)
        self.assertEqual(one(samples, "docker_router_users_active"), 0)
        self.assertEqual(one(samples, "docker_router_connection_duration_seconds_count"), 0)
        self.assertEqual(one(samples, "docker_router_backend_connect_seconds_count"), 0)
        self.assertEqual(one(samples, "docker_router_build_info", version="0.1.0"), 1)
        self.assertFalse([k for k in samples if k[0].startswith("docker_router_user_")])

    def test_countsWhatHappened(self):
        """
        Bytes equal the checksummed transfers (a live stream's included),
        counts equal the connections made, and a live connection is active.
        """
        router = self.startRouter("--metrics-per-user")
        self.harness.startBackend(UID_A, "echo")
        sizes = [1 << 20, 300 * KiB + 7, 12345]
        for seed, size in enumerate(sizes):
            agent = self.harness.startAgent(UID_A)
            agent.call("connect", path=router.listenPath)
            result = agent.call("echoTransfer", seed=seed, size=size)
            self.assertEqual(result["received"]["sha"], result["sent"]["sha"], result)
            router.connectionDone(agent.ready["pid"])
        # A long-lived stream, still open when scraped.
        live = self.harness.startAgent(UID_A)
        live.call("connect", path=router.listenPath)
        live.call("send", data=b64(b"y" * 5000))
        self.assertEqual(unb64(live.call("recvExact", size=5000)["data"]), b"y" * 5000)
        # A refusal: no daemon for UID_B (the readiness probe was the first).
        self.get(UID_B)
        samples = self.scrape()
        moved = sum(sizes) + 5000
        self.assertEqual(
            (
                one(samples, "docker_router_bytes_total", direction="to_docker"),
                one(samples, "docker_router_bytes_total", direction="from_docker"),
            ),
            (moved, moved),
            router.evidence(),
        )
        self.assertEqual(one(samples, "docker_router_connections_total", result="relayed"), 4)
        self.assertEqual(one(samples, "docker_router_connections_total", result="missing"), 2)
        self.assertEqual(one(samples, "docker_router_connections_active"), 1)
        self.assertEqual(one(samples, "docker_router_users_active"), 1)
        self.assertEqual(one(samples, "docker_router_connection_duration_seconds_count"), 3)
        self.assertEqual(one(samples, "docker_router_backend_connect_seconds_count"), 4)
        user = str(UID_A)  # no name in the user database: routed by number
        self.assertEqual(one(samples, "docker_router_user_connections_active", user=user), 1)
        self.assertEqual(
            one(samples, "docker_router_user_bytes_total", user=user, direction="to_docker"), moved
        )
        self.assertEqual(
            one(samples, "docker_router_user_bytes_total", user=user, direction="from_docker"), moved
        )
        live.call("close")


class FloodTests(MetricsTestCase):
    def test_floodOverTheCapKeepsTheLogShort(self):
        """
        300 clients at a time looping over a small per-user cap: the log
        grows by a few lines, and the metrics count every refusal.
        """
        router = self.startRouter("--max-connections-per-user", "2")
        self.harness.startBackend(UID_B, "selectEcho")
        holder = self.harness.startAgent(UID_B)
        held = holder.call("holdMany", path=router.listenPath, count=2)
        self.assertEqual(held["echoed"], 2, held)
        before = len(router.log().splitlines())
        flood = self.harness.startAgent(UID_B)
        refused = 0
        for _ in range(5):
            burst = flood.call("burst", seconds=120, path=router.listenPath, count=300,
                               data=b64(lineRequest()))
            self.assertNotIn("echo", burst["answers"], burst)
            refused += burst["answers"].get("HTTP/1.1 429 Too Many Requests", 0)
        self.assertGreaterEqual(refused, 1400)
        samples = self.scrape()
        self.assertEqual(one(samples, "docker_router_connections_total", result="too_many"), refused)
        grown = router.log().splitlines()[before:]
        self.assertLessEqual(len(grown), 24, "\n".join(grown[:40]))
        self.assertEqual(len([line for line in grown if "cause=too-many" in line]), 1, grown)


def statusCommand(*args, uid=None):
    """
    Run C{docker-router status} from the tests' environment, as root or as
    C{uid}: (exit status, stdout, stderr).
    """
    script = os.path.join(os.path.dirname(sys.executable), "docker-router")
    drop = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
    done = subprocess.run(
        [script, "status"] + list(args), capture_output=True, text=True, timeout=60, **drop
    )
    return done.returncode, done.stdout, done.stderr


class StatusTests(IntegrationTestCase):
    def startRouter(self, control=None):
        self.control = control or "unix:%s:mode=600" % (
            os.path.join(self.harness.tmp, "control.sock"),
        )
        return self.harness.startRouter(args=["--control", self.control])

    def test_liveStreamShows(self):
        """
        A live, long-lived connection shows in the table and in JSON, with
        its bytes so far and its age.
        """
        router = self.startRouter()
        self.harness.startBackend(UID_A, "echo")
        live = self.harness.startAgent(UID_A)
        live.call("connect", path=router.listenPath)
        live.call("send", data=b64(b"z" * 5000))
        self.assertEqual(len(unb64(live.call("recvExact", size=5000)["data"])), 5000)
        code, out, err = statusCommand("--control", self.control, "--json")
        self.assertEqual(code, 0, err)
        status = json.loads(out)
        [user] = status["users"]
        self.assertEqual(
            (user["uid"], user["user"], user["connections"], user["bytesToDocker"], user["bytesFromDocker"]),
            (UID_A, str(UID_A), 1, 5000, 5000),
        )
        self.assertGreater(user["oldestSeconds"], 0)
        self.assertEqual(status["totals"]["connections"], 1)
        self.assertEqual(status["pid"], router.pid)
        code, out, err = statusCommand("--control", self.control)
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["USER", "UID", "CONNECTIONS", "TO", "DOCKER", "FROM", "DOCKER", "OLDEST"])
        self.assertEqual(lines[1].split()[:6], [str(UID_A), str(UID_A), "1", "4.9", "KiB", "4.9"])
        self.assertEqual(lines[2].split()[:4], ["TOTAL", "1", "users", "1"])
        live.call("close")
        pollUntil(lambda: json.loads(statusCommand("--control", self.control, "--json")[1])["users"] == [],
                  10, what="the closed connection to leave the status")

    def test_needsRoot(self):
        """
        Anyone but root is told it needs root; a non-root client that
        reaches the socket anyway is refused by the router.
        """
        path = os.path.join(self.harness.tmp, "control.sock")
        router = self.startRouter("unix:%s:mode=666" % (path,))
        code, out, err = statusCommand("--control", self.control, uid=UID_A)
        self.assertEqual((code, out), (2, ""))
        self.assertIn("needs root", err)
        reply = self.harness.startAgent(UID_A).call(
            "raw", path=path, data=b64(b"GET /status HTTP/1.0\r\n\r\n"), shutdown=True
        )
        status, _, body = parseResponse(unb64(reply["head"]))
        self.assertEqual((status, json.loads(body)), (403, {"message": "docker-router status needs root"}),
                         router.evidence())

    def test_notRootOverTcp(self):
        """
        A control endpoint on TCP (an admin's choice) can't tell who asks, so
        it answers no one: even root's request is refused.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        router = self.startRouter("tcp:%d:interface=127.0.0.1" % (port,))
        router.waitLog(r"starting on %d$" % (port,))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/status")
        response = connection.getresponse()
        self.assertEqual((response.status, json.loads(response.read())),
                         (403, {"message": "docker-router status needs root"}), router.evidence())

    def test_takenOrMissingIsAWarning(self):
        """
        A control endpoint another router holds, or one whose directory is
        missing, is a warning; the router serves anyway.
        """
        first = self.startRouter("unix:%s:mode=600:lockfile=1" % (os.path.join(self.harness.tmp, "c.sock"),))
        second = self.harness.startRouter(
            listenPath=os.path.join(self.harness.tmp, "second.sock"), args=["--control", self.control]
        )
        second.waitLog(r"not serving the control endpoint on .*c\.sock.*: another docker-router serves it$")
        missing = "unix:%s/nowhere/c.sock:mode=600" % (self.harness.tmp,)
        third = self.harness.startRouter(
            listenPath=os.path.join(self.harness.tmp, "third.sock"), args=["--control", missing]
        )
        third.waitLog(r"not serving the control endpoint on .*nowhere/c\.sock:mode=600: its directory does not exist$")
        self.assertEqual(statusCommand("--control", self.control)[0], 0, first.evidence())
        for router in (first, second, third):
            self.assertIsNone(router.process.poll())


class ReloadTests(MetricsTestCase):
    def exchange(self, uid, router, data):
        """One request by a fresh client of C{uid}; the raw answer."""
        agent = self.harness.startAgent(uid)
        reply = agent.call("raw", path=router.listenPath, data=b64(data), shutdown=True)
        return unb64(reply["head"])

    def test_reloadAppliesToNewConnectionsOnly(self):
        """
        SIGHUP re-reads the file: a lower cap refuses new connections while
        a live relay keeps flowing; then a broken file leaves the router
        serving with the settings it had, and is counted.
        """
        path = os.path.join(self.harness.tmp, "docker-router.toml")
        with open(path, "w") as f:
            f.write("max-connections-per-user = 3\n")
        router = self.startRouter("--config", path)
        self.harness.startBackend(UID_A, "echo")
        self.harness.startBackend(UID_B, "http")
        live = self.harness.startEchoLoop(UID_A, router.listenPath)
        request = lineRequest()
        self.assertEqual(self.exchange(UID_A, router, request), request)  # 2 of 3

        with open(path, "w") as f:
            f.write("# fewer\nmax-connections-per-user = 1\n")
        os.kill(router.pid, signal.SIGHUP)
        router.waitLog(r"reloaded on SIGHUP: .*%s applied to new connections" % (re.escape(path),))
        status, _, body = parseResponse(self.exchange(UID_A, router, request))
        self.assertEqual(status, 429, router.evidence())
        self.assertIn("at most 1 connections", json.loads(body)["message"])
        progressed = live.waitEvent("progress", 20, len(live.events))[1]["ok"]
        self.assertGreater(progressed, 0)

        with open(path, "w") as f:
            f.write("max-connections-per-user = 5\nconnect-timeout = = 3\n")
        os.kill(router.pid, signal.SIGHUP)
        router.waitLog(r"reload: still running with the previous configuration: .*line 2")
        self.assertEqual(parseResponse(self.exchange(UID_A, router, request))[0], 429)
        self.assertServedBy(self.get(UID_B, router=router), UID_B, router)
        samples = self.scrape()
        self.assertEqual(one(samples, "docker_router_reloads_total", result="ok"), 1)
        self.assertEqual(one(samples, "docker_router_reloads_total", result="error"), 1)
        live.waitEvent("progress", 20, len(live.events))
        self.assertEqual(live.count("failed"), 0, live.events[-3:])
        self.assertIsNone(router.process.poll(), router.evidence())


class MetricsSocketTests(IntegrationTestCase):
    def test_scrapedOverTcpFromASocketSystemdHandsOver(self):
        """
        As with etc/docker-router-metrics.socket: systemd listens on
        127.0.0.1 and hands the socket over with the Docker one; the router
        takes each by its name, and Prometheus scrapes over TCP.
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            self.skipTest("no systemd-socket-activate")
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        path = self.harness.listenPath
        router = self.harness.startRouter(
            wrapper=[activate, "-l", path, "-l", "127.0.0.1:%d" % (port,),
                     "--fdname=docker-router.socket:metrics"],
            listen="systemd:domain=UNIX:name=docker-router.socket",
            args=["--metrics", "systemd:domain=INET:name=metrics", "--control", ""],
        )
        os.chmod(path, 0o666)
        self.harness.startBackend(UID_A, "http")
        self.assertServedBy(self.get(UID_A), UID_A, router)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode("utf-8")
        connection.close()
        self.assertEqual(response.status, 200, body[:300])
        self.assertIn('docker_router_connections_total{result="relayed"} 1.0', body)
