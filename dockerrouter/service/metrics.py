"""
Prometheus metrics of a running router, served over HTTP by C{twisted.web}.

Everything is read from the factory's live state when Prometheus scrapes (a
collector, not counters bumped per event): bytes come from the splicers' own
counts, so open streams are included and nothing is done per chunk; the two
histograms are plain bucket counts the factory adds to once per connection.  A scrape is answered in the reactor thread, so it sees one
consistent state; it does no I/O and costs time in the number of live
connections.
"""

from bisect import bisect_left
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.web.resource import Resource
from twisted.web.server import Request

from dockerrouter import __version__
from dockerrouter.routing.reasons import BackendUnusable
from dockerrouter.service.provision import RESULTS as PROVISION_RESULTS
from dockerrouter.service.starter import RESULTS as START_RESULTS
from dockerrouter.service.web import QuietSite

if TYPE_CHECKING:
    from dockerrouter.relay.factory import RouterFactory

# Streams (`docker logs -f`, `docker events`, attach) last hours; a ping
# lasts milliseconds.
DURATION_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 6 * 3600.0, 24 * 3600.0)
# A Unix connect and two SO_PEERCRED reads take microseconds; a full backlog
# is retried up to the connect timeout.
CONNECT_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0)


def rejectionCauses() -> list[str]:
    """Every cause a connection can be refused for, as the log names them."""
    causes, classes = set(), [BackendUnusable]
    while classes:
        kind = classes.pop()
        causes.add(kind.cause)
        classes.extend(kind.__subclasses__())
    return sorted(causes)


class RouterMetrics:
    """
    The metrics of one L{RouterFactory}, in a registry of their own (tests
    run many routers in one process).

    @ivar reloads: reloads of the configuration by result (the reloader's
        own counts).
    """

    def __init__(self, factory: "RouterFactory", reloads: dict[str, int]) -> None:
        self.factory = factory
        self.reloads = reloads
        self.registry = CollectorRegistry(auto_describe=False)
        self.durations = factory.durations = Buckets(DURATION_BUCKETS)
        self.connectTimes = factory.connectTimes = Buckets(CONNECT_BUCKETS)
        self.registry.register(_LiveState(self))

    def site(self) -> QuietSite:
        """A web site answering C{GET /metrics}."""
        root = Resource()
        root.putChild(b"metrics", _MetricsPage(self.registry))
        return QuietSite(root)


class Buckets:
    """
    A histogram's counts, kept by what observes it: a bisect and two
    additions per observation (prometheus_client's C{Histogram} takes a lock
    and walks every bucket).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            cumulative.append((floatToGoString(bound), total))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.sum)


class _LiveState:
    """Reads the factory at scrape time."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self._results = ["relayed"] + rejectionCauses()

    def collect(self) -> Iterator[Metric]:
        """Every family, read from the live state now (one method per family)."""
        factory = self._metrics.factory
        yield self._connections(factory)
        yield self._bySocket(factory)
        yield GaugeMetricFamily(
            "docker_router_connections_active", "Live connections.", value=len(factory.relays)
        )
        yield GaugeMetricFamily(
            "docker_router_users_active", "Users with live connections.", value=factory.usersActive()
        )
        total, live = self._liveBytes(factory)
        yield self._bytes(factory, total)
        yield self._reloads()
        yield self._starts(factory)
        yield self._provisions(factory)
        yield self._metrics.durations.family(
            "docker_router_connection_duration_seconds",
            "How long relayed connections lasted, from accept to close.",
        )
        yield self._metrics.connectTimes.family(
            "docker_router_backend_connect_seconds",
            "Time to connect to a user's daemon and verify who runs it.",
        )
        info = GaugeMetricFamily("docker_router_build_info", "The running version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if factory.settings.usersKept:
            yield from self._perUser(factory, live)

    def _connections(self, factory: "RouterFactory") -> Metric:
        """Every known result, at zero until counted, then any other seen."""
        results = CounterMetricFamily(
            "docker_router_connections",
            "Connections by how they were answered: relayed, or refused and why.",
            labels=["result"],
        )
        for result in self._results + sorted(set(factory.results) - set(self._results)):
            results.add_metric([result.replace("-", "_")], factory.results.get(result, 0))
        return results

    def _bySocket(self, factory: "RouterFactory") -> Metric:
        sockets = CounterMetricFamily(
            "docker_router_relayed_by_socket",
            "Relayed connections by the configured socket path (template) they went to.",
            labels=["socket"],
        )
        for template, count in sorted(factory.sockets.items()):
            sockets.add_metric([template], count)
        return sockets

    def _liveBytes(self, factory: "RouterFactory") -> tuple[list[int], dict[int, list[int]]]:
        """
        Bytes to and from Docker of the live relays so far: in all, and per
        uid when per-user series are kept.
        """
        total = [0, 0]
        live: dict[int, list[int]] = {}
        for relay in factory.relays:
            up, down = relay.bytesMoved()
            total[0] += up
            total[1] += down
            if factory.settings.usersKept:
                counts = live.setdefault(relay.backend.uid, [0, 0])
                counts[0] += up
                counts[1] += down
        return total, live

    def _bytes(self, factory: "RouterFactory", live: list[int]) -> Metric:
        """Bytes of the relays that ended, and of the live ones so far."""
        moved = CounterMetricFamily(
            "docker_router_bytes",
            "Bytes relayed, open connections included.",
            labels=["direction"],
        )
        moved.add_metric(["to_docker"], factory.endedBytes[0] + live[0])
        moved.add_metric(["from_docker"], factory.endedBytes[1] + live[1])
        return moved

    def _reloads(self) -> Metric:
        reloads = CounterMetricFamily(
            "docker_router_reloads", "Reloads of the configuration file.", labels=["result"]
        )
        for result, count in self._metrics.reloads.items():
            reloads.add_metric([result], count)
        return reloads

    def _starts(self, factory: "RouterFactory") -> Metric:
        starts = CounterMetricFamily(
            "docker_router_starts",
            "On-demand starts of users' daemons (--start) by result.",
            labels=["result"],
        )
        counts = factory.starter.counts if factory.starter is not None else {}
        for result in START_RESULTS:
            starts.add_metric([result.replace("-", "_")], counts.get(result, 0))
        return starts

    def _provisions(self, factory: "RouterFactory") -> Metric:
        provisions = CounterMetricFamily(
            "docker_router_provisions",
            "Daemons set up for users who had none (--provision), by result.",
            labels=["result"],
        )
        provisioner = getattr(factory.starter, "provisioner", None)
        counts = provisioner.counts if provisioner is not None else {}
        for result in PROVISION_RESULTS:
            provisions.add_metric([result], counts.get(result, 0))
        return provisions

    def _perUser(self, factory: "RouterFactory", live: dict[int, list[int]]) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "docker_router_user_connections_active",
            "Live connections of each recently active user.",
            labels=["user"],
        )
        moved = CounterMetricFamily(
            "docker_router_user_bytes",
            "Bytes relayed for each recently active user, open connections included.",
            labels=["user", "direction"],
        )
        for uid, (user, toDocker, fromDocker) in factory.recentUsers.items():
            up, down = live.get(uid, (0, 0))
            active.add_metric([user], factory.userConnections(uid))
            moved.add_metric([user, "to_docker"], toDocker + up)
            moved.add_metric([user, "from_docker"], fromDocker + down)
        yield active
        yield moved


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)

