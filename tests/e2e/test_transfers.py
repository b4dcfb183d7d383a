"""
Bulk data through the router, both ways: copies, image archives, a large build
context, output still in flight when a container exits, and many connections
at once. Each runs directly against the user's daemon too (C{via}).
"""

import hashlib
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.harness import uniqueName

MiB = 1 << 20


def _randomFile(path, size: int) -> str:
    """Write C{size} random bytes to C{path}; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def test_copyInAndOut(alice, image):
    """
    C{docker cp} of 50 MiB into a container and back out: same bytes.
    """
    work = alice.user.tempDir()
    source, back = work / "in.bin", work / "out.bin"
    expected = _randomFile(source, 50 * MiB)
    alice.user.give(work)
    name = uniqueName()
    alice.run("run", "-d", "--name", name, "--network", "none", image, "sleep", "600")
    try:
        alice.run("cp", str(source), f"{name}:/tmp/big", timeout=120)
        assert alice.out("exec", name, "sha256sum", "/tmp/big").split()[:1] == [expected]
        alice.run("cp", f"{name}:/tmp/big", str(back), timeout=120)
        assert back.stat().st_size == 50 * MiB
        assert _sha256(back) == expected
    finally:
        alice.removeContainers(name)


def test_saveLoadRoundTrip(alice, bob, image):
    """
    C{docker save | docker load}, from one user's daemon to the other's over
    two connections at once: the image that arrives is the one that left.
    """
    tag = f"{uniqueName('dre2e-saved')}:latest"
    alice.run("tag", image, tag)
    try:
        imageId = alice.out("image", "inspect", "--format", "{{.Id}}", tag).strip()
        assert bob.run("image", "inspect", tag, check=False).returncode != 0
        save = alice.popen(["save", tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        load = bob.popen(["load"], stdin=save.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        save.stdout.close()  # load holds the only reader now
        loaded, loadErrors = load.communicate(timeout=120)
        assert save.wait(timeout=30) == 0, save.stderr.read()
        assert load.returncode == 0, loadErrors
        assert tag in loaded.decode(), loaded
        assert bob.out("image", "inspect", "--format", "{{.Id}}", tag).strip() == imageId
    finally:
        alice.run("rmi", tag, check=False)
        bob.run("rmi", tag, check=False)


def test_legacyBuildLargeContext(alice, image):
    """
    C{DOCKER_BUILDKIT=0 docker build} with a 100 MiB context: all of it
    reaches the daemon, and the image holds the same bytes.
    """
    context = alice.user.tempDir()
    expected = _randomFile(context / "big", 100 * MiB)
    (context / "Dockerfile").write_text(f"FROM {image}\nCOPY big /big\n")
    alice.user.give(context)
    tag = f"{uniqueName('dre2e-built')}:latest"
    try:
        alice.run("build", "-q", "-t", tag, str(context), env=alice.env(DOCKER_BUILDKIT="0"), timeout=300)
        result = alice.out("run", "--rm", "--network", "none", tag, "sha256sum", "/big", timeout=120)
        assert result.split()[:1] == [expected]
    finally:
        alice.run("rmi", "-f", tag, check=False)


def _slowRead(process: subprocess.Popen, timeout: float = 120) -> bytes:
    """
    Read a child's whole stdout in small pieces with pauses, then reap it.
    """
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            chunk = process.stdout.read1(32 * 1024)
            if not chunk:
                break
            received += chunk
            assert time.monotonic() < deadline, f"only {len(received)} bytes after {timeout}s"
            # The pace of a slow reader (not synchronisation): the other end
            # writes far faster, so its data waits on the way.
            time.sleep(0.004)
        assert process.wait(timeout=30) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return bytes(received)


def test_outputAfterExit(bob, image):
    """
    A container writes 20 MiB and exits, read by a slow reader: first
    attached (C{docker run}, where the daemon ends the stream as the container
    exits), then again from the exited container (C{docker logs}, where the
    daemon writes it all at once and closes). Both arrive whole.
    """
    lines = 20 * 1024
    # Numbered 1 KiB lines, so a lost or repeated piece shows.
    script = f"awk 'BEGIN {{ for (i = 1; i <= {lines}; i++) printf \"%07d %01015d\\n\", i, 0 }}'"
    expected = b"".join(b"%07d %s\n" % (i, b"0" * 1015) for i in range(1, lines + 1))
    assert len(expected) == 20 * MiB
    name = uniqueName()
    try:
        attached = bob.popen(
            ["run", "--name", name, "--network", "none", image, "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        received = _slowRead(attached)
        assert len(received) == len(expected)
        assert received == expected
        assert bob.out("inspect", "--format", "{{.State.Status}}", name).strip() == "exited"
        logs = bob.popen(["logs", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        received = _slowRead(logs)
        assert len(received) == len(expected)
        assert received == expected
    finally:
        bob.removeContainers(name)


def test_parallelCommands(alice, bob, image):
    """
    20 docker commands at once, from two users: every one succeeds with its
    own output.
    """

    def one(i: int) -> bytes:
        docker = (alice, bob)[i % 2]
        return docker.run("run", "--rm", "--network", "none", image, "echo", f"parallel-{i}", timeout=180).stdout

    with ThreadPoolExecutor(max_workers=20) as pool:
        outputs = list(pool.map(one, range(20)))
    assert outputs == [f"parallel-{i}\n".encode() for i in range(20)]
