"""
Issue 5, rootless containers: a process inside one of dr-alice's containers
runs as one of her subordinate uids, so the router sees that uid, not hers.
With subuid routing (the default) such a client reaches dr-alice's own
daemon; with C{--no-subuid} it is an unknown uid with no daemon and gets the
router's error.

The container runs as a non-root user (C{--user 1000:1000}), with the router
socket bind-mounted at /var/run/docker.sock and the host's static docker CLI
bind-mounted in.  The socket lives under the e2e temporary root in /tmp, not
/run: rootlesskit gives each daemon a copied-up /run of its own, where a
socket made later would not appear.

The container's findings come back through a bind-mounted directory rather
than its stdout, so that they do not depend on the daemon's log streams.
"""

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.e2e.harness import IMAGE, Docker, startRouter, uniqueName, whichDocker
from tests.integration.harness import pollUntil

STATIC_CLI = "/usr/local/bin/docker"
CONTAINER_UID = 1000


def _subuidStart(name: str) -> int:
    with open("/etc/subuid") as f:
        for line in f:
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[0] == name:
                return int(fields[1])
    raise AssertionError(f"{name} has no /etc/subuid range")


@pytest.fixture(scope="module")
def staticCli():
    """
    The host docker CLI to run inside a busybox container: it has to be
    statically linked (there is no libc in there).
    """
    if not os.path.exists(STATIC_CLI):
        pytest.skip(f"no {STATIC_CLI}")
    kind = subprocess.run(["file", "-L", STATIC_CLI], capture_output=True).stdout.decode()
    if "statically linked" not in kind:
        pytest.skip(f"{STATIC_CLI} is not statically linked: {kind.strip()}")
    return STATIC_CLI


@pytest.fixture(scope="module")
def subuidRouter(environment, tmpRoot):
    router = startRouter(tmpRoot, [])
    yield router
    router.stop()
    assert "Traceback" not in router.log(), router.evidence()


@pytest.fixture(scope="module")
def noSubuidRouter(environment, tmpRoot):
    router = startRouter(tmpRoot, ["--no-subuid"])
    yield router
    router.stop()
    assert "Traceback" not in router.log(), router.evidence()


@pytest.fixture(scope="module")
def aliceDirect(environment):
    """dr-alice's docker CLI straight to her own daemon (to run the container)."""
    user = environment["dr-alice"]
    return Docker(whichDocker(), user, user.ownSocket, "direct")


@pytest.fixture
def marker(aliceDirect):
    """A container of dr-alice's own, for the inner CLI to find."""
    name = uniqueName("subuid-marker")
    aliceDirect.run("create", "--name", name, "--network", "none", IMAGE, "true")
    yield name
    aliceDirect.removeContainers(name)


def _runInside(alice, router, cli, image, tmpRoot):
    """
    Run C{docker ps -a} and C{docker images} inside one of dr-alice's
    containers as uid 1000 through C{router}; return each command's
    (status, stdout, stderr) and the container's name.
    """
    hostUid = _subuidStart("dr-alice") + CONTAINER_UID - 1
    out = Path(tempfile.mkdtemp(prefix="subuid-out-", dir=tmpRoot))
    os.chown(out, hostUid, hostUid)
    os.chmod(out, 0o755)
    name = uniqueName("subuid-inner")
    script = (
        "docker ps -a --format '{{.Names}}' >/out/ps 2>/out/ps.err; echo $? >/out/ps.rc; "
        "docker images --format '{{.Repository}}:{{.Tag}}' >/out/images 2>/out/images.err; "
        "echo $? >/out/images.rc"
    )
    try:
        alice.run(
            "run", "--rm", "--name", name, "--network", "none",
            "--user", f"{CONTAINER_UID}:{CONTAINER_UID}",
            "-e", "HOME=/tmp",
            "-v", f"{router.listenPath}:/var/run/docker.sock",
            "-v", f"{cli}:/usr/local/bin/docker:ro",
            "-v", f"{out}:/out",
            image, "/bin/sh", "-c", script,
            timeout=120,
        )
        found = {}
        for what in ("ps", "images"):
            rc = (out / f"{what}.rc").read_text().strip()
            found[what] = (int(rc), (out / what).read_text(), (out / f"{what}.err").read_text())
    finally:
        alice.removeContainers(name)
    return hostUid, name, found


def test_containerUserReachesOwnersDaemon(
    aliceDirect, subuidRouter, staticCli, marker, tmpRoot
):
    """
    A non-root process in dr-alice's container (a uid in her subuid range)
    sees her containers and images through the router, and the router logs
    that uid routed to her daemon.
    """
    hostUid, inner, found = _runInside(aliceDirect, subuidRouter, staticCli, IMAGE, tmpRoot)
    status, ps, err = found["ps"]
    assert status == 0, f"docker ps -a failed inside: {err}\n{subuidRouter.evidence()}"
    names = ps.split()
    assert marker in names and inner in names, names
    status, images, err = found["images"]
    assert status == 0, f"docker images failed inside: {err}"
    assert IMAGE in images.split(), images
    own = aliceDirect.user.ownSocket
    pollUntil(
        lambda: re.search(
            rf"connection done: uid={hostUid} .*backend={re.escape(own)} ", subuidRouter.log()
        ),
        10,
        what=lambda: f"uid {hostUid} routed to {own} in\n{subuidRouter.log()[-3000:]}",
    )


def test_noSubuidRefusesContainerUser(
    aliceDirect, noSubuidRouter, staticCli, tmpRoot
):
    """
    With C{--no-subuid} the same client is just an unknown uid: the CLI
    inside gets the router's error (naming that uid), not dr-alice's daemon.
    """
    hostUid, inner, found = _runInside(aliceDirect, noSubuidRouter, staticCli, IMAGE, tmpRoot)
    for what in ("ps", "images"):
        status, out, err = found[what]
        assert status != 0, f"docker {what} succeeded inside: {out}"
        assert "Error response from daemon" in err, err
        assert str(hostUid) in err, err
        assert inner not in out
    pollUntil(
        lambda: re.search(rf"rejected uid={hostUid} .*cause=missing", noSubuidRouter.log()),
        10,
        what=lambda: f"the rejection of uid {hostUid} in\n{noSubuidRouter.log()[-3000:]}",
    )
