"""
The docker CLI's interactive and long-lived streams through the router: hijacked
attach and exec connections (stdin, half-close, terminals), followed logs and
the event stream. Each runs directly against the user's daemon too (C{via}).
"""

import os
import subprocess
import time

import pytest

from tests.e2e.harness import Lines, Pty, uniqueName


@pytest.mark.parametrize("user", ["dr-alice", "dr-bob"])
def test_versionAndRun(dockerAs, user, image):
    """
    The server answers C{docker version}, and a container's output comes back.
    """
    docker = dockerAs(user)
    server = docker.out("version", "--format", "{{.Server.Version}}").strip()
    assert server and server[0].isdigit(), server
    result = docker.run("run", "--rm", "--network", "none", image, "echo", "hello")
    assert result.stdout == b"hello\n"


def test_stdinEndsContainer(alice, image):
    """
    C{echo abc | docker run -i}: the client's end of stdin reaches the
    container (C{wc} only answers at EOF), and the command exits.
    """
    result = alice.run("run", "-i", "--rm", "--network", "none", image, "wc", "-c", input=b"abc\n", timeout=60)
    assert result.stdout.strip() == b"4"


@pytest.fixture
def sleeper(alice, image):
    """A running container to exec into."""
    name = uniqueName()
    alice.run("run", "-d", "--name", name, "--network", "none", image, "sleep", "600")
    yield name
    alice.removeContainers(name)


def test_execStdinMebibyte(alice, sleeper):
    """
    C{docker exec -i} with 1 MiB on stdin: every byte arrives, then EOF.
    """
    result = alice.run("exec", "-i", sleeper, "wc", "-c", input=os.urandom(1 << 20), timeout=60)
    assert result.stdout.strip() == b"1048576"


def test_interactiveTerminal(bob, image):
    """
    C{docker run -it} under a pseudo-terminal: the terminal's size reaches the
    container, typed input is echoed back and run, C{exit} ends it.
    """
    name = uniqueName()
    pty = Pty(rows=33, cols=101)
    try:
        process = bob.popen(["run", "-it", "--rm", "--name", name, "--network", "none", image, "sh"], **pty.childArgs())
        pty.childStarted()
        try:
            pty.expect(b"# ", timeout=30)
            # The size is set by a separate resize request once the container
            # runs, so ask until it has landed.
            deadline = time.monotonic() + 15
            while True:
                pty.write(b"stty size\r")
                seen = pty.expect(b"# ", timeout=15)
                if b"33 101" in seen:
                    break
                assert time.monotonic() < deadline, f"terminal size never reached the container: {seen!r}"
            pty.write(b"echo typed-$((6*7))\r")
            # The shell echoes what we typed, then prints what it computed.
            assert b"echo typed-$((6*7))" in pty.expect(b"typed-42", timeout=15)
            pty.write(b"exit\r")
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
                bob.removeContainers(name)
    finally:
        pty.close()


def test_logsFollowStreams(alice, image):
    """
    C{docker logs -f} delivers each line when the container prints it (one
    every 0.5 s), not all at the end, and ends when the container does.
    """
    name = uniqueName()
    count = 6
    script = (
        "echo ready; while [ ! -e /tmp/go ]; do sleep 0.05; done; "
        f"for i in $(seq 1 {count}); do echo line$i; sleep 0.5; done"
    )
    alice.run("run", "-d", "--name", name, "--network", "none", image, "sh", "-c", script)
    try:
        follower = alice.popen(["logs", "-f", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # Once "ready" is through, the follow stream is live: every line
            # after it is printed only then, so must come through the stream.
            lines = Lines(follower.stdout)
            assert lines.next(timeout=30) == b"ready\n"
            alice.run("exec", name, "touch", "/tmp/go")
            arrivals = []
            for expected in range(1, count + 1):
                line = lines.next(timeout=10)
                arrivals.append(time.monotonic())
                assert line == f"line{expected}\n".encode()
            assert follower.wait(timeout=30) == 0
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        spread = arrivals[-1] - arrivals[0]
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        # Printed over ~2.5 s: arriving together would mean buffering.
        assert spread > 1.5, f"lines arrived within {spread:.3f}s of each other: gaps {gaps}"
        assert sum(1 for g in gaps if g > 0.2) >= count - 2, f"gaps between lines: {gaps}"
    finally:
        alice.removeContainers(name)


def test_eventsStream(bob, image):
    """
    A long-lived C{docker events} stream sees containers created over other
    connections while it runs.
    """
    first, second = uniqueName(), uniqueName()
    since = str(int(time.time()) - 1)
    events = bob.popen(
        ["events", "--since", since, "--filter", "type=container", "--filter", "event=create",
         "--format", "{{.Actor.Attributes.name}}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # --since makes the first event arrive even if the stream connected
        # late; once it has, the stream is live, and the second container is
        # created only then.
        bob.run("create", "--name", first, "--network", "none", image, "true")
        lines = Lines(events.stdout)
        assert _nextMatching(lines, first) == first
        bob.run("create", "--name", second, "--network", "none", image, "true")
        assert _nextMatching(lines, second) == second
        assert events.poll() is None, "the event stream ended"
    finally:
        events.terminate()
        events.wait(timeout=10)
        bob.removeContainers(first, second)


def _nextMatching(lines: Lines, name: str, timeout: float = 20) -> str:
    """
    Read event lines until one names C{name}: another test's containers may
    appear in between.
    """
    deadline = time.monotonic() + timeout
    while True:
        line = lines.next(timeout=max(deadline - time.monotonic(), 0.01))
        assert line, f"event stream ended before {name}"
        if line.decode().strip() == name:
            return name
