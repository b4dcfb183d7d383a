"""
Who reaches which daemon: through the router each user gets their own daemon
and sees only their own things, and a user without a daemon gets the router's
error, naming their socket, quickly.
"""

import re
import time

from tests.e2e.harness import Docker, uniqueName, whichDocker
from tests.integration.harness import pollUntil


def test_eachUserReachesOwnDaemon(router, environment):
    """
    Through the router, each user talks to the very daemon at their own
    socket (same daemon ID as asked directly), the two users' daemons
    differ, and the router logs each finished connection with its bytes.
    """
    ids = {}
    for name in ("dr-alice", "dr-bob"):
        user = environment[name]
        routed = Docker(whichDocker(), user, router.listenPath, "router")
        direct = Docker(whichDocker(), user, user.ownSocket, "direct")
        ids[name] = routed.out("info", "--format", "{{.ID}}").strip()
        assert ids[name], "empty daemon ID"
        assert ids[name] == direct.out("info", "--format", "{{.ID}}").strip()
        done = re.compile(
            rf"connection done: uid={user.uid} user={name} pid=\d+ backend={re.escape(user.ownSocket)} "
            r"duration=[\d.]+s to_docker=[1-9]\d* from_docker=[1-9]\d* end=\S+"
        )
        pollUntil(
            lambda: done.search(router.log()),
            10,
            what=lambda: f"a 'connection done' line for {name} in\n{router.log()[-2000:]}",
        )
    assert ids["dr-alice"] != ids["dr-bob"]


def test_usersSeeOnlyTheirOwn(alice, bob, image):
    """
    Each user's containers and images are visible to them and not to the
    other.
    """
    mine = {docker: (uniqueName(f"iso-{docker.user.name}"), f"{uniqueName('iso-image')}:latest") for docker in (alice, bob)}
    try:
        for docker, (container, tag) in mine.items():
            docker.run("create", "--name", container, "--network", "none", image, "true")
            docker.run("tag", image, tag)
        for docker in (alice, bob):
            other = bob if docker is alice else alice
            containers = docker.out("ps", "-a", "--format", "{{.Names}}").split()
            images = docker.out("images", "--format", "{{.Repository}}:{{.Tag}}").split()
            assert mine[docker][0] in containers and mine[docker][1] in images
            assert mine[other][0] not in containers, f"{docker.user.name} sees {other.user.name}'s container"
            assert mine[other][1] not in images, f"{docker.user.name} sees {other.user.name}'s image"
            refused = docker.run("inspect", mine[other][0], check=False)
            assert refused.returncode != 0 and b"No such object" in refused.stderr
    finally:
        for docker, (container, tag) in mine.items():
            docker.removeContainers(container)
            docker.run("rmi", tag, check=False)


def test_userWithoutDaemon(request, dockerAs, via):
    """
    dr-carol has no daemon: through the router her client fails within
    seconds with the router's message naming her socket (directly, the CLI's
    own "Cannot connect" is the control), and the router logs the rejection.
    """
    carol = dockerAs("dr-carol")
    socketPath = carol.user.ownSocket
    started = time.monotonic()
    result = carol.run("ps", check=False, timeout=30)
    elapsed = time.monotonic() - started
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert socketPath in stderr, stderr
    if via == "direct":
        assert "Cannot connect to the Docker daemon" in stderr, stderr
        return
    assert "Error response from daemon" in stderr, stderr
    router = request.getfixturevalue("router")
    pollUntil(
        lambda: f"rejected uid={carol.user.uid} user=dr-carol" in router.log()
        and "cause=missing" in router.log(),
        10,
        what=lambda: f"the router's rejection line for dr-carol in\n{router.log()[-2000:]}",
    )
