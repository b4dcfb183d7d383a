"""
Operating the router with the real docker CLI: a live C{docker events}
stream shows in C{docker-router status} and in the metrics while it lasts.
"""

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.e2e.harness import VENV_BIN, Docker, startRouter, whichDocker
from tests.integration.harness import pollUntil


@pytest.fixture
def watchedRouter(environment, tmpRoot):
    """A router of its own, with a control endpoint and metrics."""
    directory = Path(tempfile.mkdtemp(prefix="router-ops-", dir=tmpRoot))
    control = f"unix:{directory}/control.sock:mode=600"
    router = startRouter(tmpRoot, ["--control", control, "--metrics", f"unix:{directory}/metrics.sock:mode=600"])
    router.control = control
    router.metricsPath = str(directory / "metrics.sock")
    yield router
    router.stop()


def status(router) -> dict:
    out = subprocess.run(
        [str(VENV_BIN / "docker-router"), "status", "--json", "--control", router.control],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    return json.loads(out)


def activeConnections(router) -> float:
    from dockerrouter.cli import getUnix

    body = getUnix(router.metricsPath, "/metrics")[1].decode()
    [line] = [l for l in body.splitlines() if l.startswith("docker_router_connections_active ")]
    return float(line.split()[1])


def test_liveEventsStreamShows(environment, watchedRouter):
    bob = environment["dr-bob"]
    docker = Docker(whichDocker(), bob, watchedRouter.listenPath, "router")
    events = docker.popen(["events"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def oneLive():
            users = status(watchedRouter)["users"]
            return users if [u["connections"] for u in users] == [1] else None

        [user] = pollUntil(oneLive, 30, interval=0.2, what="the events stream in docker-router status")
        assert (user["user"], user["uid"]) == ("dr-bob", bob.uid)
        assert user["bytesToDocker"] > 0
        assert activeConnections(watchedRouter) == 1
        assert events.poll() is None
    finally:
        events.terminate()
        events.wait(timeout=10)
    pollUntil(lambda: status(watchedRouter)["users"] == [], 30, interval=0.2, what="the stream to leave the status")
    assert activeConnections(watchedRouter) == 0
