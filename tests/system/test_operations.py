"""
What an admin and a user's container meet under the real, sandboxed unit:
C{docker-router status}, metrics scraped over TCP through the metrics socket
unit, and a process in a user's rootless container reaching that user's own
daemon (the namespace proof needs the unit's capabilities: issue 12).

One machine for the module, set up as README.md says, with dr-alice (a
rootless daemon) and dr-carol (none).
"""

import json
import os
import re
import shutil

import pytest
import readme
from conftest import IMAGE, installedMachine, pollUntil

SERVICE = "docker-router.service"
STATIC_CLI = "/usr/local/bin/docker"


@pytest.fixture(scope="module")
def m(release):
    with installedMachine(release, daemons=["dr-alice"], others=["dr-carol"]) as machine:
        yield machine


def test_statusCommand(m):
    """
    C{docker-router status}, on root's PATH after README's install, lists a
    user's live event stream; anyone else is told it needs root.
    """
    events = m.spawn("exec curl -sN --unix-socket /var/run/docker.sock http://docker/events", user="dr-alice")
    try:
        def alice():
            out = m.run("docker-router status --json", check=False).stdout
            users = json.loads(out)["users"] if out.strip() else []
            return [u for u in users if u["user"] == "dr-alice" and u["connections"] >= 1]

        pollUntil(alice, 15, "dr-alice's live stream in docker-router status")
        table = m.run("docker-router status").stdout
        assert re.search(r"^dr-alice\s+%d\s+[1-9]" % m.uids["dr-alice"], table, re.M), table
    finally:
        m.kill(events)
    refused = m.run("docker-router status", user="dr-carol", check=False)
    assert refused.returncode != 0 and "root" in refused.stdout + refused.stderr, refused


def test_metricsOverTcp(m):
    """
    The metrics socket unit, installed as README says, gives a stock
    Prometheus a scrape over TCP on 127.0.0.1 while the service itself keeps
    AF_UNIX only; a relayed connection is counted.
    """
    block = re.search(r"```sh\n(cp etc/docker-router-metrics.socket.*?)```",
                      open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read(), re.S)
    assert block, "README's metrics socket steps"
    m.run("cd /root/docker-router && " + block.group(1).strip().replace("\n", " && "))
    try:
        assert m.run("docker version", user="dr-alice", check=False).returncode == 0

        def relayed():
            text = m.run("curl -sf http://127.0.0.1:10079/metrics", check=False).stdout
            found = re.search(r'^docker_router_connections_total\{result="relayed"\} (\S+)', text, re.M)
            return found and float(found.group(1)) >= 1

        pollUntil(relayed, 15, "a relayed connection in the metrics scraped over TCP")
        show = m.run(f"systemctl show {SERVICE} -p RestrictAddressFamilies -p PrivateNetwork").stdout
        assert "RestrictAddressFamilies=AF_UNIX" in show and "PrivateNetwork=yes" in show, show
    finally:
        m.run("systemctl disable --now docker-router-metrics.socket; rm -f /etc/docker-router/docker-router.toml "
              f"/etc/systemd/system/docker-router-metrics.socket; systemctl daemon-reload; systemctl restart {SERVICE}",
              check=False)


def test_containerReachesItsOwner(m):
    """
    A non-root process in dr-alice's rootless container, with the router's
    socket bind-mounted, lists dr-alice's own containers through the
    sandboxed router: the router proved the client's user namespace is
    hers.
    """
    if not os.path.exists(STATIC_CLI):
        pytest.skip(f"no static docker CLI at {STATIC_CLI} to run inside a busybox container")
    # --all: the container runs this before its daemon (Debian 13's docker.io
    # 26) may have marked it running.
    inside = m.root / "usr/local/lib/dr-static-docker"
    shutil.copy2(STATIC_CLI, inside)
    os.chmod(inside, 0o755)
    name = "dr-sys-subuid"
    result = m.run(
        f"docker run --rm --name {name} --network none --user 1000:1000 "
        "-v /run/docker.sock:/var/run/docker.sock -v /usr/local/lib/dr-static-docker:/docker:ro "
        f"{IMAGE} /docker ps --all --format '{{{{.Names}}}}'", user="dr-alice", check=False, timeout=120)
    assert result.returncode == 0 and name in result.stdout.split(), result


def test_metricsNextToTheInstalledRouter(m):
    """
    Issue 19.3: README's metrics example, run as written on a host with the
    router installed, serves the installed router's metrics.
    """
    try:
        text = m.run(readme.shellBlocks("Metrics")[0]).stdout
        assert re.search(r'^docker_router_build_info\{version="[^"]+"\} 1', text, re.M), text
    finally:
        m.run(f"rm -f /etc/docker-router/docker-router.toml; systemctl restart {SERVICE}", check=False)
