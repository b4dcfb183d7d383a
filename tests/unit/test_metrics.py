"""
The metrics' own logic: per-user series bounded to the most recently active
users, and histogram buckets counted as Prometheus means them (C{le}).
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.relay.settings import Settings
from dockerrouter.routing.credentials import Credentials
from dockerrouter.service.metrics import Buckets, RouterMetrics
from dockerrouter.relay.factory import RouterFactory
from tests.unit.doubles import FakeSocket, InlineWorkers, PeerTransport, asSocket, notCached, socketFile


class PerUserTests(SynchronousTestCase):
    def test_mostRecentlyActiveOnly(self) -> None:
        reactor = MemoryReactorClock()
        resolver = BackendResolver("/x/{uid}", lookupName=lambda uid: f"u{uid}")
        factory = RouterFactory(reactor, Settings(resolver, 5, usersKept=2), workers=InlineWorkers())
        factory.routerPid = lambda: 1
        metrics = RouterMetrics(factory, {"ok": 0, "error": 0})
        relays = []

        def daemonOf(uid: int) -> None:
            factory.openSocketFile = lambda path: socketFile(uid)
            factory.openCached = notCached
            factory.connectUnix = lambda path: asSocket(FakeSocket(Credentials(5000, uid, uid)))

        for uid in (1000, 1001, 1002, 1001):
            daemonOf(uid)
            relay = factory.buildProtocol(None)
            relay.makeConnection(PeerTransport(Credentials(4000 + uid, uid, uid)))
            relays.append(relay)
        # Activity: 1000, 1001, 1002, 1001 connect, then 1000's connection
        # ends; the two most recently active are 1001 and 1000.
        relays[0]._relayEnded(None)
        samples = {
            (s.name, s.labels.get("user")): s.value
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name.startswith("docker_router_user_connections_active")
        }
        self.assertEqual(
            samples,
            {
                ("docker_router_user_connections_active", "u1001"): 2,
                ("docker_router_user_connections_active", "u1000"): 0,
            },
        )


class BucketsTests(SynchronousTestCase):
    def test_lessOrEqual(self) -> None:
        buckets = Buckets((0.1, 1.0))
        for value in (0.05, 0.1, 0.5, 1.0, 7.0):
            buckets.observe(value)
        family = buckets.family("h", "doc")
        counts = {s.labels.get("le"): s.value for s in family.samples if s.name == "h_bucket"}
        self.assertEqual(counts, {"0.1": 2, "1.0": 4, "+Inf": 5})
        self.assertEqual(
            {s.name: s.value for s in family.samples if s.name in ("h_count", "h_sum")},
            {"h_count": 5, "h_sum": 8.65},
        )


class StartsTests(SynchronousTestCase):
    def test_startsByResult(self) -> None:
        """Every result of an on-demand start has a series, zeros included."""
        factory = RouterFactory(MemoryReactorClock(), Settings(BackendResolver("/x/{uid}"), 5), workers=InlineWorkers())
        factory.starter = type("S", (), {"counts": {"started": 3, "timeout": 1}})()
        metrics = RouterMetrics(factory, {"ok": 0, "error": 0})
        samples = {
            s.labels["result"]: s.value
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name == "docker_router_starts_total"
        }
        self.assertEqual(samples["started"], 3)
        self.assertEqual(samples["timeout"], 1)
        self.assertEqual(samples["cooling_down"], 0)
        self.assertEqual(len(samples), 6)
        causes = {
            s.labels["result"]
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name == "docker_router_connections_total"
        }
        self.assertLessEqual({"start_failed", "start_timeout", "start_not_enabled"}, causes)


class ProvisionsTests(SynchronousTestCase):
    def test_provisionsByResult(self) -> None:
        """docker_router_provisions_total has every result, zeros included; its causes are connection results."""
        factory = RouterFactory(MemoryReactorClock(), Settings(BackendResolver("/x/{uid}"), 5), workers=InlineWorkers())
        provisioner = type("P", (), {"counts": {"provisioned": 2, "refused": 1}})()
        factory.starter = type("S", (), {"counts": {}, "provisioner": provisioner})()
        metrics = RouterMetrics(factory, {"ok": 0, "error": 0})
        samples = {
            s.labels["result"]: s.value
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name == "docker_router_provisions_total"
        }
        self.assertEqual(samples, {"provisioned": 2, "refused": 1, "unmet": 0, "failed": 0, "timeout": 0})
        causes = {
            s.labels["result"]
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name == "docker_router_connections_total"
        }
        self.assertLessEqual({"provision_refused", "provision_unmet", "provision_failed", "provision_timeout"}, causes)
