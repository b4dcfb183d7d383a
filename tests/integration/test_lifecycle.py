"""
The router process's life: restart after a crash, one instance per socket,
and a graceful SIGTERM.
"""

import os
import shutil
import signal
import socket
import stat
import subprocess
import time

from tests.integration.harness import UID_A, IntegrationTestCase, pollUntil, twistdCommand

# A shutdown that drained (finished or cut its relays) exits 0, not 143.
CLEAN_EXITS = (0,)


class InstanceTests(IntegrationTestCase):
    """
    One instance per socket, and a crash leaves nothing that blocks a restart.
    """

    def test_restartAfterKill9(self):
        """
        After kill -9 the socket file is left behind; a new router cleans it
        up, starts and serves.
        """
        first = self.harness.startRouter()
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        self.assertTrue(os.path.exists(self.harness.listenPath), "kill -9 left no socket file")
        second = self.harness.startRouter()
        self.harness.startBackend(UID_A, "http")
        self.assertServedBy(self.get(UID_A), UID_A, second)

    def test_secondInstanceRefuses(self):
        """
        A second router on a live socket exits non-zero with a message naming
        the socket, and leaves the first one's socket alone.
        """
        first = self.harness.startRouter()
        inode = os.stat(self.harness.listenPath).st_ino
        second = self.harness.startRouter(ready=False)
        status = second.waitExit(20)
        self.assertIsNotNone(status, "second instance still running\n%s" % (second.evidence(),))
        self.assertNotEqual(status, 0, second.evidence())
        self.assertIn(self.harness.listenPath, second.log() + second.output())
        self.assertIsNone(first.process.poll())
        self.assertEqual(os.stat(self.harness.listenPath).st_ino, inode)
        self.harness.startBackend(UID_A, "http")
        self.assertServedBy(self.get(UID_A), UID_A, first)

    def daemonized(self, listen):
        """Run twistd daemonized (no C{-n}) on C{listen}, to its exit."""
        return subprocess.run(
            twistdCommand()
            + [
                "--pidfile=" + os.path.join(self.harness.tmp, "daemon.pid"),
                "--logfile=" + os.path.join(self.harness.tmp, "daemon.log"),
                "docker-router",
                "--listen",
                listen,
            ],
            capture_output=True,
            timeout=60,
        )

    def test_daemonizedRefusal(self):
        """
        Daemonized (no C{-n}), a router that can't listen makes twistd exit
        non-zero with the reason, rather than leave its parent waiting.
        """
        result = self.daemonized("unix:/proc/docker-router-test.sock")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"cannot listen on unix:/proc/docker-router-test.sock", result.stderr)

    def test_daemonizedSecondInstance(self):
        """
        A second router started daemonized prints one clean line naming the
        pid that holds the socket (not twistd's truncated bytes repr).
        """
        first = self.harness.startRouter()
        result = self.daemonized("unix:%s:mode=666:lockfile=1" % (self.harness.listenPath,))
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.decode(),
            "docker-router: cannot listen on unix:%s:mode=666:lockfile=1: another "
            "docker-router (pid %d) is already listening there\n" % (self.harness.listenPath, first.pid),
        )

    def test_someoneElsesSocketLeavesNoLock(self):
        """
        A start that fails because another program listens at the path
        leaves no lock file behind, and the other socket alone.
        """
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        other.bind(self.harness.listenPath)
        other.listen(1)
        router = self.harness.startRouter(ready=False)
        self.assertNotEqual(router.waitExit(20), 0, router.evidence())
        self.assertIn("Address already in use", router.log() + router.output())
        self.assertFalse(os.path.lexists(self.harness.listenPath + ".lock"))
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(self.harness.listenPath)

    def test_refusesTcp(self):
        """
        A TCP endpoint (no peer credentials) is refused at start, in one line.
        """
        router = self.harness.startRouter(ready=False, listen="tcp:0:interface=127.0.0.1")
        self.assertNotEqual(router.waitExit(20), 0)
        self.assertEqual(
            router.output(),
            "docker-router: cannot listen on tcp:0:interface=127.0.0.1: only Unix stream "
            "sockets carry the peer credentials docker-router routes by (unix:PATH, or "
            "systemd:domain=UNIX:index=N)\n",
        )

    def test_stopLeavesAnothersSocket(self):
        """
        A socket someone else bound at the path while the router ran
        survives the router's stop, with a warning in the log.
        """
        router = self.harness.startRouter()
        os.unlink(self.harness.listenPath)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        other.bind(self.harness.listenPath)
        other.listen(1)
        router.process.send_signal(signal.SIGTERM)
        self.assertIn(router.waitExit(20), CLEAN_EXITS, router.evidence())
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(self.harness.listenPath)
        self.assertTrue(router.logMatches(r"left %s in place" % (self.harness.listenPath,)), router.evidence())


class ShutdownTests(IntegrationTestCase):
    """
    SIGTERM: stop accepting at once, drain, then abort what is left.
    """

    def liveRelay(self, router):
        """
        An agent with an open, working relay through C{router} to an echo.
        """
        self.harness.startBackend(UID_A, "echo")
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=router.listenPath)
        agent.call("send", data="aGVsbG8=")
        self.assertEqual(agent.call("recvExact", size=5)["data"], "aGVsbG8=")
        return agent

    def terminate(self, router):
        """
        SIGTERM the router; check its socket file is gone within about a
        second and new connections fail.
        """
        router.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        pollUntil(
            lambda: not os.path.exists(router.listenPath), 5, what="the socket file to disappear"
        )
        self.assertLess(time.monotonic() - started, 1.5, router.evidence())
        self.assertIn(router.tryConnect(), ("ENOENT", "ECONNREFUSED"))

    def test_drain(self):
        """
        A relay live at SIGTERM goes on working until it ends by itself; then
        the router exits cleanly without waiting out the shutdown timeout.
        """
        router = self.harness.startRouter(["--shutdown-timeout", "20"])
        agent = self.liveRelay(router)
        self.terminate(router)
        self.assertIsNone(
            router.process.poll(), "exited with a relay still live\n%s" % (router.evidence(),)
        )
        agent.call("send", data="d29ybGQ=")
        self.assertEqual(agent.call("recvExact", size=5)["data"], "d29ybGQ=", router.evidence())
        agent.call("shutdownWrite")
        self.assertEqual(agent.call("recvAll")["error"], None)
        status = router.waitExit(5)
        self.assertIn(status, CLEAN_EXITS, router.evidence())
        done = router.connectionDone(agent.ready["pid"], seconds=1)
        self.assertEqual((done["to_docker"], done["from_docker"]), ("10", "10"))

    def test_abortAfterShutdownTimeout(self):
        """
        A relay still open past --shutdown-timeout is aborted and the router
        exits cleanly.
        """
        router = self.harness.startRouter(["--shutdown-timeout", "1"])
        agent = self.liveRelay(router)
        started = time.monotonic()
        self.terminate(router)
        status = router.waitExit(6)
        elapsed = time.monotonic() - started
        self.assertIn(status, CLEAN_EXITS, router.evidence())
        self.assertGreater(elapsed, 0.9, "exited before the shutdown timeout")
        ended = agent.call("recvAll", seconds=10, timeout=5)
        self.assertNotEqual(ended["error"], "timeout")


class SocketActivationTests(IntegrationTestCase):
    """
    Under systemd socket activation (here C{systemd-socket-activate}, as
    there is no systemd to run the units).
    """

    def test_adoptsTheSocketAndLeavesItsPath(self):
        """
        The router serves on the socket it is handed, and when it stops it
        leaves the path in place for systemd, which owns it.
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            self.skipTest("no systemd-socket-activate")
        path = self.harness.listenPath
        router = self.harness.startRouter(
            wrapper=[activate, "-l", path, "--fdname=docker.sock"],
            listen="systemd:domain=UNIX:index=0",
        )
        os.chmod(path, 0o666)  # what the socket unit's SocketMode=0666 does
        self.harness.startBackend(UID_A, "http")
        self.assertServedBy(self.get(UID_A), UID_A, router)
        router.process.send_signal(signal.SIGTERM)
        self.assertIn(router.waitExit(20), CLEAN_EXITS, router.evidence())
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode), "the socket's path is gone")

    def test_refusesADatagramSocket(self):
        """
        A socket handed over that is not a Unix stream socket (here
        C{ListenDatagram=}) is refused in one line.
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            self.skipTest("no systemd-socket-activate")
        path = self.harness.listenPath
        router = self.harness.startRouter(
            wrapper=[activate, "--datagram", "-l", path, "--fdname=docker.sock"],
            listen="systemd:domain=UNIX:index=0",
            ready=False,
        )
        pollUntil(lambda: os.path.exists(path), 10, what="the datagram socket")
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", path)
        self.assertNotEqual(router.waitExit(20), 0, router.evidence())
        self.assertIn(
            "docker-router: cannot listen on systemd:domain=UNIX:index=0: systemd handed "
            "over a AF_UNIX/SOCK_DGRAM socket, not a Unix stream socket",
            router.output(),
        )

    def test_socketSurvivesRestart(self):
        """
        A router that stops leaves the socket systemd holds listening, with
        its backlog: the next router started on it serves, and meanwhile the
        kernel queues connects.  (Here a shell plays systemd's restart: it
        holds the socket and starts the router twice.)
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            self.skipTest("no systemd-socket-activate")
        path = self.harness.listenPath
        restart = 'for i in 1 2; do sh -c \'LISTEN_PID=$$ exec "$@"\' sh "$@"; done'
        router = self.harness.startRouter(
            wrapper=[activate, "-l", path, "--fdname=docker.sock", "sh", "-c", restart, "sh"],
            listen="systemd:domain=UNIX:index=0",
        )
        os.chmod(path, 0o666)
        self.harness.startBackend(UID_A, "http")

        def routerPid():
            with open("/proc/%d/task/%d/children" % (router.pid, router.pid)) as f:
                return [int(pid) for pid in f.read().split()]

        first = pollUntil(routerPid, 10, what="the first router")[0]
        self.assertServedBy(self.get(UID_A), UID_A, router)
        os.kill(first, signal.SIGTERM)
        second = pollUntil(
            lambda: [pid for pid in routerPid() if pid != first], 20, what="the second router"
        )[0]
        self.assertServedBy(self.get(UID_A), UID_A, router)
        listening = subprocess.run(["ss", "-xlnH", "src", path], capture_output=True, text=True).stdout
        self.assertEqual(listening.split()[3], "4096", listening)
        self.assertIn(router.waitLog(r"shutdown: \d+ connections finished") is not None, (True,))
        os.kill(second, signal.SIGTERM)
        self.assertIn(router.waitExit(20), CLEAN_EXITS, router.evidence())
