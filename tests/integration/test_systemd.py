"""
The router under systemd's protocols, with the real process: readiness and
the watchdog through a C{$NOTIFY_SOCKET} of the test's own, SIGHUP as a
reload, and a socket systemd holds (C{systemd-socket-activate}) surviving a
restart.
"""

import os
import signal
import socket

from tests.integration.harness import UID_A, IntegrationTestCase, pollUntil

from tests.integration.test_lifecycle import CLEAN_EXITS


class NotifySocket:
    """A datagram socket playing systemd's notify socket."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages = []

    def receive(self):
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def waitFor(self, line, after=0, seconds=20):
        """The index of the first message from C{after} on holding C{line}."""

        def found():
            for index, message in enumerate(self.receive()[after:], after):
                if line in message.splitlines():
                    return index + 1  # true even for index 0
            return None

        return pollUntil(found, seconds, what="%r from the router" % (line,)) - 1

    def close(self):
        self.sock.close()


class NotifyTests(IntegrationTestCase):
    def startNotified(self, args=(), environ=()):
        notify = NotifySocket(os.path.join(self.harness.tmp, "notify"))
        self.addCleanup(notify.close)
        wrapper = ["env", "NOTIFY_SOCKET=" + notify.path] + list(environ)
        router = self.harness.startRouter(args, wrapper=wrapper, ready=False)
        return notify, router

    def test_readyStatusWatchdogStopping(self):
        """
        READY=1 comes when a connect works (checked on receipt, with no
        retry), WATCHDOG=1 keeps coming, STOPPING=1 at SIGTERM, then exit 0.
        """
        notify, router = self.startNotified(environ=["WATCHDOG_USEC=400000"])
        ready = notify.waitFor("READY=1")
        self.assertIsNone(router.tryConnect(), router.evidence())
        self.assertIn("STATUS=0 connections, 0 users", notify.messages[ready].splitlines())
        notify.waitFor("WATCHDOG=1", after=ready + 1)
        watchdog = notify.waitFor("WATCHDOG=1", after=notify.waitFor("WATCHDOG=1") + 1)
        router.process.send_signal(signal.SIGTERM)
        notify.waitFor("STOPPING=1", after=watchdog)
        self.assertIn(router.waitExit(20), CLEAN_EXITS, router.evidence())

    def test_hangUpReloads(self):
        """
        SIGHUP: RELOADING=1 then READY=1, one log line, a live relay goes on
        flowing, the router keeps serving, and the subordinate uid file is
        read again even when its size, time and inode look unchanged.
        """
        subuid = os.path.join(self.harness.tmp, "subuid")
        with open(subuid, "w") as f:
            f.write("%d:70000:100\n" % (UID_A + 1,))
        stamp = os.stat(subuid)
        notify, router = self.startNotified(["--subuid-file", subuid])
        ready = notify.waitFor("READY=1")
        self.harness.startBackend(UID_A, "echo")
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=router.listenPath)
        agent.call("send", data="aGVsbG8=")
        self.assertEqual(agent.call("recvExact", size=5)["data"], "aGVsbG8=")
        with open(subuid, "w") as f:
            # Same size: root's range now, which the router must warn about.
            f.write("00000:70000:100\n")
        os.utime(subuid, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

        router.process.send_signal(signal.SIGHUP)
        reloading = notify.waitFor("RELOADING=1", after=ready + 1)
        self.assertTrue(
            any(line.startswith("MONOTONIC_USEC=") for line in notify.messages[reloading].splitlines())
        )
        notify.waitFor("READY=1", after=reloading + 1)
        router.waitLog(r"subuid:1: ignored \(owned by uid 0")
        router.waitLog(r"reloaded on SIGHUP: 0 subordinate uid ranges from ")
        self.assertIsNone(router.process.poll(), router.evidence())
        agent.call("send", data="d29ybGQ=")
        self.assertEqual(agent.call("recvExact", size=5)["data"], "d29ybGQ=", router.evidence())
