"""
Harness for the integration tests: the real C{twistd -n docker-router}
process, and backends and clients running as other uids.

The router's whole job is to act on the uid of whoever connects, so these
tests must run as root to connect (and listen) as arbitrary uids.  Every
process started here is killed at cleanup, even when a test fails, and every
wait polls with a deadline instead of sleeping.
"""

import base64
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from twisted.trial.unittest import SynchronousTestCase

from tests.integration import children

# Unprivileged uids with no entry in the user database (routing must work by
# number), and a named one.
UID_A = 61001
UID_B = 61002
NOBODY = 65534

_CHILD_SOURCE = None


def childSource():
    """
    The text of L{children}, passed with C{-c}: other uids may not be allowed
    to read the checkout.
    """
    global _CHILD_SOURCE
    if _CHILD_SOURCE is None:
        with open(children.__file__.replace(".pyc", ".py")) as f:
            _CHILD_SOURCE = f.read()
    return _CHILD_SOURCE


def twistdCommand():
    """
    The twistd that comes with the interpreter running the tests, so that the
    router runs from the same environment (the venv) the tests do.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Deadline:
    """
    A point in time to poll against, so that no wait can hang a run.
    """

    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self):
        return max(0.0, self.end - time.monotonic())

    def expired(self):
        return time.monotonic() >= self.end


def pollUntil(predicate, seconds, interval=0.02, what="condition"):
    """
    Call C{predicate} until it returns something true, and return that: the
    one polling loop of the integration and end-to-end harnesses.

    @param what: what we wait for, or a callable saying it (called only on a
        timeout, so that it can show the latest state).
    @raise AssertionError: when C{seconds} pass first, naming C{what}.
    """
    deadline = Deadline(seconds)
    while True:
        value = predicate()
        if value:
            return value
        if deadline.expired():
            raise AssertionError(
                "timed out after %ss waiting for %s" % (seconds, what() if callable(what) else what)
            )
        time.sleep(interval)


def b64(data):
    """
    Bytes for a JSON command to an agent.
    """
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text.encode("ascii"))


def lineRequest(method="GET", url="/_ping", body=b"", extra=b""):
    """
    The bytes of a small HTTP/1.1 request as the docker CLI would send it.
    """
    head = b"%s %s HTTP/1.1\r\nHost: docker\r\nUser-Agent: integration-test\r\n" % (
        method.encode(),
        url.encode(),
    )
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % (len(body),)
    return head + extra + b"\r\n" + body


def parseResponse(raw):
    """
    Split raw response bytes into (status, headers dict lower-cased, body).
    """
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError("no complete response head in %r" % (raw[:500],))
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def killGroup(process):
    """Kill a child started in its own session, and everything it started."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(10)


class Child:
    """
    A process of ours speaking JSON lines on stdout (see L{children}).

    stdin stays a pipe: agents read commands from it, and a backend blocked on
    it ends when we do.
    """

    def __init__(self, harness, name, conf, uid=None, gid=None, groups=()):
        """
        @param gid: its primary group (default: C{uid}).
        @param groups: its supplementary groups.
        """
        self.name = name
        self.uid = uid
        self.events = []
        self._buffer = b""
        self.stderrPath = os.path.join(harness.tmp, "%s.stderr" % (name,))
        stderr = open(self.stderrPath, "wb")
        drop = {}
        if uid is not None:
            # extra_groups so the child does not keep root's groups.
            drop = dict(user=uid, group=uid if gid is None else gid, extra_groups=list(groups))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", childSource(), json.dumps(conf)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=harness.tmp,
                env={"PATH": "/usr/bin:/bin", "HOME": harness.tmp, "LANG": "C.UTF-8"},
                start_new_session=True,
                **drop,
            )
        finally:
            stderr.close()
        os.set_blocking(self.process.stdout.fileno(), False)
        harness.track(self)

    @property
    def pid(self):
        return self.process.pid

    def stderr(self):
        with open(self.stderrPath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def pump(self, timeout=0.0):
        """
        Take in whatever lines have arrived, waiting at most C{timeout}.
        """
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        while ready:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._buffer += data
            ready, _, _ = select.select([fd], [], [], 0)
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.events.append(json.loads(line))

    def waitEvent(self, kind, seconds=20, start=0):
        """
        The first event of C{kind} at index C{start} or later, polling the
        pipe until C{seconds} pass.
        """
        deadline = Deadline(seconds)
        while True:
            for index in range(start, len(self.events)):
                if self.events[index].get("event") == kind:
                    return index, self.events[index]
            if self.process.poll() is not None:
                self.pump()
                if not any(e.get("event") == kind for e in self.events[start:]):
                    raise AssertionError(
                        "%s exited (%s) before %r; stderr:\n%s"
                        % (self.name, self.process.returncode, kind, self.stderr()[-2000:])
                    )
                continue
            if deadline.expired():
                raise AssertionError(
                    "%s: no %r event within %ss; stderr:\n%s"
                    % (self.name, kind, seconds, self.stderr()[-2000:])
                )
            self.pump(min(0.1, deadline.remaining()))

    def waitReady(self, seconds=20):
        return self.waitEvent("ready", seconds)[1]

    def count(self, kind, field=None):
        """
        How many C{kind} events so far, or the sum of their C{field}.
        """
        self.pump()
        chosen = [e for e in self.events if e.get("event") == kind]
        if field is None:
            return len(chosen)
        return sum(e[field] for e in chosen)

    def last(self, kind, field, default=None):
        """
        C{field} of the latest C{kind} event so far.
        """
        self.pump()
        for event in reversed(self.events):
            if event.get("event") == kind:
                return event[field]
        return default

    def kill(self):
        killGroup(self.process)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class Backend(Child):
    """
    A small server listening at a path as some uid (modes in L{children}).
    """

    def __init__(self, harness, name, uid, path, mode, **conf):
        self.path = path
        Child.__init__(
            self, harness, name, dict(role="backend", path=path, mode=mode, **conf), uid
        )
        self.ready = self.waitReady()

    def receivedBytes(self):
        """
        Bytes a recording backend has been sent, so far.
        """
        return self.count("data", "bytes")

    def settle(self, seconds=10):
        """
        Wait until every connection a recording backend accepted has closed,
        so that L{receivedBytes} is final and a zero means zero.
        """
        try:
            pollUntil(lambda: self.count("accepted") == self.count("closed"), seconds)
        except AssertionError:
            counts = (self.count("accepted"), self.count("closed"))
            raise AssertionError(
                "%s: connections still open after %ss (accepted %d, closed %d); stderr:\n%s"
                % ((self.name, seconds) + counts + (self.stderr()[-2000:],))
            )


class Agent(Child):
    """
    A client running as some uid, driven one command at a time.
    """

    def __init__(self, harness, name, uid, gid=None, groups=()):
        Child.__init__(self, harness, name, dict(role="agent"), uid, gid, groups)
        self.ready = self.waitReady()
        self._next = len(self.events)

    def call(self, op, seconds=60, **args):
        """
        Run one operation of L{children.Agent} and return its reply.
        """
        self.begin(op, **args)
        return self.reply(seconds)

    def begin(self, op, **args):
        """Start one operation (see L{call}); its reply comes from L{reply}."""
        self._op = op
        self.process.stdin.write((json.dumps(dict(op=op, **args)) + "\n").encode())
        self.process.stdin.flush()

    def reply(self, seconds=60):
        """The reply to the operation L{begin} started."""
        index, reply = self.waitEvent("reply", seconds, self._next)
        self._next = index + 1
        if "exception" in reply:
            raise AssertionError("%s: %s failed: %s" % (self.name, self._op, reply["detail"]))
        return reply


class Router:
    """
    The real C{twistd -n docker-router} process: the one launcher of the
    integration and end-to-end tests.
    """

    def __init__(
        self, directory, name="router", listenPath=None, template=None, args=(), wrapper=(), listen=None, passFds=()
    ):
        """
        @param directory: where its log, output and (by default) socket go;
            other uids must be able to traverse it to reach the socket.
        @param template: C{--user-socket}, or C{None} for the default.
        @param listen: the C{--listen} endpoint, if not a Unix socket at
            C{listenPath}.
        @param passFds: descriptors the process inherits (for C{wrapper}).
        """
        self.name = name
        self.listenPath = listenPath or os.path.join(directory, "%s.sock" % (name,))
        self.logPath = os.path.join(directory, "%s.log" % (name,))
        self.outputPath = os.path.join(directory, "%s.output" % (name,))
        self.command = list(wrapper) + twistdCommand() + [
            "-n",
            "--pidfile=",
            "--logfile=" + self.logPath,
            "docker-router",
            "--listen",
            listen or "unix:%s:mode=666:lockfile=1" % (self.listenPath,),
        ]
        if template is not None:
            self.command += ["--user-socket", template]
        self.command += list(args)
        output = open(self.outputPath, "wb")
        try:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=directory,
                start_new_session=True,
                pass_fds=passFds,
            )
        finally:
            output.close()

    @property
    def pid(self):
        return self.process.pid

    def log(self):
        try:
            with open(self.logPath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def output(self):
        with open(self.outputPath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def evidence(self, lines=30):
        """
        The end of the router's log and output, for failure messages.
        """
        log = "\n".join(self.log().splitlines()[-lines:])
        return "--- %s log (tail) ---\n%s\n--- %s stdout/stderr ---\n%s" % (
            self.name,
            log,
            self.name,
            self.output()[-2000:],
        )

    def tryConnect(self):
        """
        One connect attempt to the listening socket, closed at once; the
        errno name on failure.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(self.listenPath)
            return None
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        finally:
            sock.close()

    def waitReady(self, seconds=20):
        """
        Poll-connect until the router accepts (the contract's readiness).
        """

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(
                    "router exited with %s before listening\n%s"
                    % (self.process.returncode, self.evidence())
                )
            return self.tryConnect() is None

        pollUntil(
            listening,
            seconds,
            interval=0.05,
            what=lambda: "the router to listen on %s\n%s" % (self.listenPath, self.evidence()),
        )
        return self

    def waitExit(self, seconds):
        """
        The exit status, or C{None} if still running after C{seconds}.
        """
        try:
            return self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            return None

    def rss(self):
        """
        Resident memory in bytes, from /proc (VmRSS).
        """
        with open("/proc/%d/status" % (self.pid,)) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for %d" % (self.pid,))

    def descriptors(self):
        """
        The router's open descriptors by kind (C{socket}, C{pipe},
        C{anon_inode}, C{file}), from /proc.
        """
        kinds = {}
        directory = "/proc/%d/fd" % (self.pid,)
        for name in os.listdir(directory):
            try:
                target = os.readlink(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def inFlight(self):
        """
        Bytes the router holds in flight, as the kernel counts them: in its
        pipes (FIONREAD) and queued on its sockets for peers that have not
        read them (SIOCOUTQ, overhead included), each asked on a duplicate
        of the router's descriptor (pidfd_getfd, Linux 5.6).
        """
        import ctypes
        import fcntl
        import struct
        import termios

        syscall = ctypes.CDLL(None, use_errno=True).syscall
        pidfd = os.pidfd_open(self.pid)
        total = 0
        try:
            for name in os.listdir("/proc/%d/fd" % (self.pid,)):
                try:
                    kind = os.readlink("/proc/%d/fd/%s" % (self.pid, name)).split(":")[0]
                except FileNotFoundError:
                    continue
                ask = {"pipe": termios.FIONREAD, "socket": termios.TIOCOUTQ}.get(kind)
                fd = syscall(438, pidfd, int(name), 0) if ask else -1  # pidfd_getfd
                if fd < 0:
                    continue
                try:
                    total += struct.unpack("i", fcntl.ioctl(fd, ask, b"\0" * 4))[0]
                except OSError:
                    pass  # a listening socket
                finally:
                    os.close(fd)
        finally:
            os.close(pidfd)
        return total

    def logMatches(self, pattern):
        return [m for m in re.finditer(pattern, self.log(), re.MULTILINE)]

    def waitLog(self, pattern, seconds=10):
        """
        The first match of C{pattern} in the log, polled.
        """
        try:
            return pollUntil(lambda: self.logMatches(pattern), seconds, what=pattern)[0]
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.evidence()))

    def connectionDone(self, pid, seconds=10):
        """
        The C{connection done} record of the client with this pid, as a dict.
        """
        match = self.waitLog(r"connection done: (.*\bpid=%d\b.*)$" % (pid,), seconds)
        return dict(re.findall(r"(\w+)=(\S+)", match.group(1)))

    def stop(self, seconds=20):
        """
        SIGTERM, and the exit status; SIGKILL (and a failure) only when it
        won't go.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.waitExit(seconds)
        if status is None:
            self.kill()
            raise AssertionError("router ignored SIGTERM for %ss\n%s" % (seconds, self.evidence()))
        return status

    def kill(self):
        killGroup(self.process)


class Harness:
    """
    One temporary directory and everything running in it for one test.

    Layout: C{tmp} (0755, so other uids can reach the router's socket),
    C{tmp/docker.sock} the router, C{tmp/backends} (1777, like /tmp, so every
    test uid can make its own socket) holding C{{uid}.sock}.
    """

    def __init__(self, testCase):
        self.tmp = tempfile.mkdtemp(prefix="dr-it-")
        os.chmod(self.tmp, 0o755)
        self.backends = os.path.join(self.tmp, "backends")
        os.mkdir(self.backends)
        os.chmod(self.backends, 0o1777)
        self.listenPath = os.path.join(self.tmp, "docker.sock")
        self.template = os.path.join(self.backends, "{uid}.sock")
        self._processes = []
        self._names = {}
        testCase.addCleanup(self.cleanup)

    def track(self, process):
        self._processes.append(process)

    def cleanup(self):
        """
        Kill everything, newest first, then remove the directory (kept when
        DOCKER_ROUTER_KEEP_TMP is set, for post-mortems).
        """
        for process in reversed(self._processes):
            process.kill()
        if os.environ.get("DOCKER_ROUTER_KEEP_TMP"):
            sys.stderr.write("kept %s\n" % (self.tmp,))
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _name(self, base):
        n = self._names[base] = self._names.get(base, 0) + 1
        return base if n == 1 else "%s-%d" % (base, n)

    def backendPath(self, uid):
        return self.template.format(uid=uid)

    def userDirectory(self, uid):
        """
        A private directory owned by C{uid}, like a home or $XDG_RUNTIME_DIR.
        """
        path = os.path.join(self.tmp, "home-%d" % (uid,))
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)
            os.chown(path, uid, uid)
        return path

    def startRouter(
        self, args=(), template=None, listenPath=None, wrapper=(), ready=True, listen=None, passFds=()
    ):
        """
        Start a router; by default wait until it accepts connections.

        @param listen: the C{--listen} endpoint, if not a Unix socket at
            C{listenPath}.
        """
        router = Router(
            self.tmp,
            self._name("router"),
            listenPath or self.listenPath,
            template or self.template,
            args,
            wrapper,
            listen,
            passFds,
        )
        self.track(router)
        if ready:
            router.waitReady()
        return router

    def startBackend(self, uid, mode, path=None, **conf):
        """
        A backend of C{mode} running as C{uid} (C{0} for a root decoy), by
        default at the uid's templated path.
        """
        if path is None:
            path = self.backendPath(uid)
        name = self._name("backend-%s-%d" % (mode, uid))
        return Backend(self, name, None if uid == 0 else uid, path, mode, **conf)

    def startDecoy(self, path, uid=0):
        """
        A recording backend: proves no byte reaches a server that isn't the
        client's own.
        """
        where = self.tmp if uid == 0 else self.userDirectory(uid)
        record = os.path.join(where, "%s.record" % (self._name("decoy"),))
        return self.startBackend(uid, "record", path, record=record)

    def startAgent(self, uid, gid=None, groups=()):
        """A client of C{uid}, in primary group C{gid} and C{groups} if given."""
        return Agent(self, self._name("agent-%d" % (uid,)), None if uid == 0 else uid, gid, groups)

    def startEchoLoop(self, uid, path, **conf):
        """
        A long-lived client of C{uid} checking round trips through C{path}
        to an echo daemon (see L{children.echoLoop}), once it is going.
        """
        conf = dict(role="echoLoop", path=path, **conf)
        loop = Child(self, self._name("echoLoop-%d" % (uid,)), conf, uid)
        loop.waitReady()
        return loop

    def startFlipper(self, uid, link, targets):
        conf = dict(role="flipper", link=link, targets=targets)
        flipper = Child(self, self._name("flipper-%d" % (uid,)), conf, uid)
        flipper.waitReady()
        return flipper

    def symlink(self, target, link, owner=None):
        """
        Point C{link} at C{target}, replacing whatever is there; owned by
        C{owner} as if that user had made it.
        """
        try:
            os.unlink(link)
        except FileNotFoundError:
            pass
        os.symlink(target, link)
        if owner is not None:
            os.lchown(link, owner, owner)


class IntegrationTestCase(SynchronousTestCase):
    """
    Base for the integration tests: root only, a fresh L{Harness} each test.
    """

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest(
                "integration tests run as root: they listen and connect as other uids"
            )
        self.harness = Harness(self)

    def get(self, uid, url="/_ping", router=None):
        """
        One GET through the router by a fresh agent running as C{uid}.
        """
        listenPath = router.listenPath if router else self.harness.listenPath
        return self.harness.startAgent(uid).call("http", path=listenPath, method="GET", url=url)

    def assertServedBy(self, reply, uid, router):
        """
        An http reply came from the L{children} http backend running as C{uid}.
        """
        self.assertEqual(reply.get("status"), 200, "%r\n%s" % (reply, router.evidence()))
        self.assertEqual(json.loads(unb64(reply["body"]))["uid"], uid)

    def assertCleanHttpError(self, reply, uid, path, user=None):
        """
        An http.client reply is a Docker-shaped error naming uid and path,
        read in full and followed by a clean EOF; return its message.
        """
        self.assertEqual(reply.get("stage"), "done", reply)
        self.assertGreaterEqual(reply["status"], 400, reply)
        headers = {k.lower(): v for k, v in reply["headers"]}
        self.assertEqual(headers.get("connection", "").lower(), "close", reply)
        self.assertIn("application/json", headers.get("content-type", ""), reply)
        message = json.loads(unb64(reply["body"]))["message"]
        self.assertIn(str(uid), message)
        self.assertIn(path, message)
        if user is not None:
            self.assertIn(user, message)
        self.assertEqual((reply["tailLen"], reply["tailError"]), (0, None), reply)
        return message

    def assertHttpError(self, raw, uid, path, user=None):
        """
        Raw response bytes are a Docker-shaped error naming uid and path;
        return its message.
        """
        status, headers, body = parseResponse(raw)
        self.assertGreaterEqual(status, 400, raw[:500])
        self.assertEqual(headers.get("connection", "").lower(), "close", raw[:500])
        message = json.loads(body)["message"]
        self.assertIn(str(uid), message)
        self.assertIn(path, message)
        if user is not None:
            self.assertIn(user, message)
        return message
