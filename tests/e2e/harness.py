"""
The pieces the end-to-end tests are made of: the test users and the docker CLI
run as one of them against one socket.  The router process and the polling
loop are the integration harness's (L{tests.integration.harness.Router},
L{tests.integration.harness.pollUntil}).

The tests run as root and start every docker client under the test user's own
uid, because the router routes by the client's SO_PEERCRED uid: a client that
ran as root would be routed to root's daemon, not the user's.
"""

import fcntl
import os
import pwd
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pytest

from tests.integration.harness import Router

# Made by .ci/rootless-docker.sh start.
IMAGE = os.environ.get("DR_E2E_IMAGE", "dr-busybox:latest")
DAEMON_USERS = ("dr-alice", "dr-bob")
NO_DAEMON_USER = "dr-carol"
USER_SOCKET_TEMPLATE = "/run/user/{uid}/docker.sock"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The python that clients under a test uid run (it has the Docker SDK): by
# default the one running the tests, so it must be one other uids can reach
# (Debian's, in a venv outside any 0700 directory; see README).
VENV_BIN = Path(os.environ.get("DR_E2E_VENV_BIN", os.path.dirname(sys.executable)))


def uniqueName(prefix: str = "dre2e") -> str:
    """
    A container or image name no other test (or earlier run) uses.
    """
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class User:
    """
    A test user, and the temporary home (owned by them) that their docker
    clients write their configuration into.
    """

    name: str
    uid: int
    gid: int
    home: str
    # Supplementary groups its processes run with (none by default).
    groups: tuple[int, ...] = ()

    @property
    def ownSocket(self) -> str:
        """The user's own daemon socket: what the router should route them to."""
        return USER_SOCKET_TEMPLATE.format(uid=self.uid, user=self.name)

    @classmethod
    def make(cls, name: str, tmpRoot: str) -> "User":
        entry = pwd.getpwnam(name)
        home = tempfile.mkdtemp(prefix=f"home-{name}-", dir=tmpRoot)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        os.chmod(home, 0o700)
        return cls(name, entry.pw_uid, entry.pw_gid, home)

    def tempDir(self) -> Path:
        """A fresh directory inside the user's home, for files they read or write."""
        path = Path(tempfile.mkdtemp(dir=self.home))
        os.chown(path, self.uid, self.gid)
        return path

    def give(self, path: Path) -> Path:
        """Make C{path} (and everything below it) the user's."""
        for root, dirs, files in os.walk(path):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chown(name, self.uid, self.gid)
        return path

    def processArgs(self, env: dict) -> dict:
        """
        C{subprocess} keyword arguments that run a child as this user, with
        no supplementary groups left over from root.
        """
        return dict(
            user=self.uid,
            group=self.gid,
            extra_groups=list(self.groups),
            env=env,
            cwd=self.home,
        )


class Docker:
    """
    The docker CLI as one user, talking to one socket (the router's, or the
    user's own daemon's as the control).
    """

    def __init__(self, cli: str, user: User, socketPath: str, via: str):
        self.cli = cli
        self.user = user
        self.socketPath = socketPath
        self.via = via

    def __repr__(self) -> str:
        return f"<docker as {self.user.name} via {self.via} ({self.socketPath})>"

    def env(self, **extra: str) -> dict:
        env = {
            "PATH": PATH,
            "HOME": self.user.home,
            "USER": self.user.name,
            "LOGNAME": self.user.name,
            "DOCKER_HOST": f"unix://{self.socketPath}",
            "DOCKER_CLI_HINTS": "false",
            "LANG": "C.UTF-8",
        }
        env.update(extra)
        return env

    def popen(self, args: Sequence[str], env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            [self.cli, *args], **self.user.processArgs(env or self.env()), **kwargs
        )

    def run(
        self,
        *args: str,
        input: Optional[bytes] = None,
        timeout: float = 60,
        check: bool = True,
        env: Optional[dict] = None,
    ) -> subprocess.CompletedProcess:
        """
        Run C{docker ARGS} to the end; with C{check}, fail the test with its
        output unless it exited 0.
        """
        try:
            result = subprocess.run(
                [self.cli, *args],
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                **self.user.processArgs(env or self.env()),
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"{self!r}: docker {' '.join(args)} still running after {timeout}s; "
                f"stdout={e.stdout!r:.300} stderr={e.stderr!r:.300}"
            ) from None
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self!r}: docker {' '.join(args)} exited {result.returncode}; "
                f"stdout={result.stdout!r:.500} stderr={result.stderr!r:.1000}"
            )
        return result

    def out(self, *args: str, **kwargs) -> str:
        """The stdout of a successful C{docker ARGS}, as text."""
        return self.run(*args, **kwargs).stdout.decode()

    def python(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """
        Run Python C{code} as this user (the venv's python, which has the
        Docker SDK), with DOCKER_HOST pointing at our socket.
        """
        try:
            return subprocess.run(
                [str(VENV_BIN / "python"), "-c", code],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                **self.user.processArgs(self.env()),
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"{self!r}: python code still running after {timeout}s; "
                f"stdout={e.stdout!r:.300} stderr={e.stderr!r:.2000}"
            ) from None

    def removeContainers(self, *names: str) -> None:
        """Best-effort cleanup, so one failing test doesn't leave containers to the next."""
        if names:
            self.run("rm", "-f", *names, check=False, timeout=60)


def startRouter(tmpRoot: str, args=()) -> Router:
    """
    The real router in a fresh directory below C{tmpRoot}, listening;
    stopped by its caller.
    """
    directory = tempfile.mkdtemp(prefix="router-", dir=tmpRoot)
    # Clients under other uids reach the socket through this directory.
    os.chmod(directory, 0o755)
    process = Router(directory, args=args)
    try:
        process.waitReady(30)
    except AssertionError as e:
        process.kill()
        pytest.fail(str(e), pytrace=False)
    return process


class Pty:
    """
    A pseudo-terminal to run an interactive client under, read with deadlines.
    """

    def __init__(self, rows: int = 33, cols: int = 101):
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.buffer = b""

    def childArgs(self) -> dict:
        """Popen arguments that make the pty the child's controlling terminal."""

        def controllingTerminal():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        return dict(
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=controllingTerminal,
        )

    def childStarted(self) -> None:
        # Our copy would keep the terminal open after the child exits.
        os.close(self.slave)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float) -> bytes:
        """
        Read until C{needle} has arrived (since the last expect); fail with
        what did arrive otherwise.
        """
        deadline = time.monotonic() + timeout
        while needle not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not seen on the terminal within {timeout}s; got {self.buffer!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child side is closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {needle!r}; got {self.buffer!r}")
                self.buffer += chunk
        index = self.buffer.index(needle) + len(needle)
        seen, self.buffer = self.buffer[:index], self.buffer[index:]
        return seen

    def close(self) -> None:
        os.close(self.master)


def whichDocker() -> Optional[str]:
    return shutil.which("docker", path=PATH)


def pingSocket(path: str, timeout: float = 5) -> Optional[str]:
    """
    Why the daemon at C{path} can't be used, or C{None} when C{GET /_ping}
    answers OK.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        answer = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError as e:
        return f"{path}: {e}"
    finally:
        s.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        return f"{path}: answered {answer[:200]!r}"
    return None


class Lines:
    """
    Lines from a child's pipe, each read with a deadline, so a stream that
    stalls fails the test instead of hanging it.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.pending = b""
        self.ended = False

    def next(self, timeout: float) -> bytes:
        """The next line with its newline, or C{b""} at the end of the stream."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending and not self.ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no complete line within {timeout}s; got {self.pending!r}")
            ready, _, _ = select.select([self.pipe], [], [], remaining)
            if ready:
                chunk = os.read(self.pipe.fileno(), 65536)
                self.pending += chunk
                self.ended = not chunk
        if b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            return line + b"\n"
        line, self.pending = self.pending, b""
        return line
