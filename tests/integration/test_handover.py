"""
Restarts nobody notices: live connections handed from one real router
process to the next through a file descriptor store, with a small service
manager of the test's own playing systemd (the notify socket's C{FDSTORE=1},
C{FDSTOREREMOVE=1} and C{BARRIER=1}, and C{LISTEN_FDS}/C{LISTEN_FDNAMES}/
C{LISTEN_PID} for the next process, set by a wrapper that execs the router
as systemd does).
"""

import array
import os
import select
import signal
import socket
import sys
import threading

from tests.integration.children import patternDigest
from tests.integration.harness import UID_A, IntegrationTestCase, b64, lineRequest, parseResponse, pollUntil, unb64
from tests.integration.test_lifecycle import CLEAN_EXITS

# What the wrapper does before it execs the router: move the stored
# descriptors to 3, 4, ... and say so in the environment, with its own pid.
_WRAPPER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds)) for fd in fds]
for fd in fds:
    os.close(fd)
for n, fd in enumerate(high):
    os.dup2(fd, 3 + n)
    os.close(fd)
if fds:
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2], LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[3], sys.argv[3:])
"""

STORE_MAX = 4096


class ServiceManager:
    """
    A notify socket that keeps the descriptors sent to its store, by name,
    and starts each router with them, as systemd does for a unit with
    C{FileDescriptorStoreMax=}.
    """

    def __init__(self, harness):
        self.harness = harness
        self.path = os.path.join(harness.tmp, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.store = []  # (name, fd), in the order stored
        self.messages = []
        # Whether FDSTOREREMOVE=1 is ignored (as if lost).
        self.dropRemovals = False
        self._lock = threading.Lock()
        # Handles each datagram as it comes, as systemd does (a router
        # waits for its barrier; a removal closes systemd's copy at once).
        self._stop = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            ready, _, _ = select.select([self.sock, self._stop[0]], [], [])
            if self._stop[0] in ready:
                return
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 16))
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self._handle(fields, list(fds))

    def _handle(self, fields, fds):
        self.messages.append(fields)
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                self.store.append((fields["FDNAME"], fd))
        elif fields.get("FDSTOREREMOVE") == "1" and not self.dropRemovals:
            for name, fd in [entry for entry in self.store if entry[0] == fields["FDNAME"]]:
                os.close(fd)
                self.store.remove((name, fd))
        else:
            for fd in fds:  # BARRIER=1: closing it is the answer
                os.close(fd)

    def closeAllBut(self, prefix):
        """Close what the store holds but names starting with C{prefix}."""
        with self._lock:
            for name, fd in [entry for entry in self.store if not entry[0].startswith(prefix)]:
                os.close(fd)
                self.store.remove((name, fd))

    def names(self):
        with self._lock:
            return [name for name, _ in self.store]

    def start(self, args=()):
        """A router started with the store's descriptors, as systemd would."""
        with self._lock:
            fds = [fd for _, fd in self.store]
            names = [name for name, _ in self.store]
        wrapper = [
            sys.executable,
            "-c",
            _WRAPPER,
            ",".join(map(str, fds)),
            ":".join(names),
            "/usr/bin/env",
            "NOTIFY_SOCKET=" + self.path,
            "FDSTORE=%d" % (STORE_MAX,),
        ]
        return self.harness.startRouter(args, wrapper=wrapper, passFds=fds)

    def stop(self, router):
        """Stop C{router} as systemd does (SIGTERM), taking what it stores."""
        router.process.send_signal(signal.SIGTERM)
        router.waitExit(20)
        assert router.process.returncode in CLEAN_EXITS, "%s\n%s" % (router.process.returncode, router.evidence())

    def restart(self, router, args=()):
        """Stop C{router}, then start the next one."""
        self.stop(router)
        return self.start(args)

    def close(self):
        os.write(self._stop[1], b"x")
        self._thread.join()
        for fd in self._stop:
            os.close(fd)
        self.sock.close()
        for _, fd in self.store:
            os.close(fd)


class HandOverTests(IntegrationTestCase):
    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.manager = ServiceManager(self.harness)
        self.addCleanup(self.manager.close)

    def test_midStream(self):
        """
        A relay streaming both ways goes through two restarts: the counter
        the daemon sends reaches the client, and the client's echo reaches
        the daemon, with no gap, repeat or reordering; the one record, by
        the last router, counts the bytes of all three.  The listener and
        every relay part are in the store while a router runs, and only
        the listener once it has taken them.
        """
        count = 3000
        backend = self.harness.startBackend(UID_A, "counter", count=count, pause=0.002)
        router = self.manager.start()
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=router.listenPath)
        agent.begin("echoCounter")
        for restart in (1, 2):
            pollUntil(lambda: backend.last("sent", "lines", 0) >= restart * 700, 30, what="the counter to go on")
            router = self.manager.restart(router)
            router.waitLog("resumed 1 connections and 0 waiting clients")
        listener = ["listen " + router.listenPath]
        pollUntil(lambda: self.manager.names() == listener, 10, what=lambda: "only %r stored: %r" % (listener, self.manager.names()))
        reply = agent.reply(60)
        self.assertEqual((reply["lines"], reply["rest"], reply["error"]), (count, 0, None), router.evidence())
        echoed = backend.waitEvent("echoed")[1]
        self.assertEqual((echoed["lines"], echoed["rest"], echoed["error"]), (count, 0, None))
        record = router.connectionDone(agent.pid)
        self.assertEqual(
            (record["to_docker"], record["from_docker"], record["end"], record["uid"]),
            (str(count * 9), str(count * 9), "closed", str(UID_A)),
        )

    def test_anOlderHandOverIsIgnored(self):
        """
        Had the store lost a router's removals, the next router finds two
        hand-overs of the same relay: it resumes the latest only, and the
        stream goes on whole.
        """
        count = 2000
        backend = self.harness.startBackend(UID_A, "counter", count=count, pause=0.002)
        self.manager.dropRemovals = True
        router = self.manager.start()
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=router.listenPath)
        agent.begin("echoCounter")
        for restart in (1, 2):
            pollUntil(lambda: backend.last("sent", "lines", 0) >= restart * 500, 30, what="the counter to go on")
            router = self.manager.restart(router)
        router.waitLog("resumed 1 connections and 0 waiting clients")
        # (The removals systemd would have done, so that the daemon sees its end.)
        self.manager.closeAllBut("listen ")
        reply = agent.reply(60)
        self.assertEqual((reply["lines"], reply["rest"], reply["error"]), (count, 0, None), router.evidence())
        echoed = backend.waitEvent("echoed")[1]
        self.assertEqual((echoed["lines"], echoed["rest"], echoed["error"]), (count, 0, None))

    def test_halfClosed(self):
        """
        A relay whose daemon has half-closed stays half-closed in the next
        process: the client has had the daemon's end, and what it sends
        afterwards all reaches the daemon, whose end the next router
        passes on.
        """
        greet, size = 100000, 3 << 20
        backend = self.harness.startBackend(UID_A, "greetThenCount", greetSize=greet, seed=5)
        router = self.manager.start()
        agent = self.harness.startAgent(UID_A)
        agent.call("connect", path=router.listenPath)
        got = agent.call("recvAll", keep=0, timeout=20)
        self.assertEqual((got["len"], got["sha"], got["error"]), (greet, patternDigest(5, greet), None))
        router = self.manager.restart(router)
        router.waitLog("resumed 1 connections")
        sent = agent.call("sendPattern", seed=9, size=size)
        self.assertEqual(sent["error"], None)
        agent.call("shutdownWrite")
        received = backend.waitEvent("received")[1]
        self.assertEqual((received["bytes"], received["sha"]), (size, patternDigest(9, size)))
        record = router.connectionDone(agent.pid)
        self.assertEqual((record["to_docker"], record["from_docker"]), (str(size), str(greet)))

    def test_newClientsWaitInTheBacklog(self):
        """
        The listening socket outlives the router that bound it: a client
        that connects between two routers is not refused, its request waits
        in the backlog, and the next router answers it; the socket file is
        the same one.
        """
        self.harness.startBackend(UID_A, "http")
        router = self.manager.start()
        inode = os.stat(router.listenPath).st_ino
        self.manager.stop(router)
        self.assertEqual(os.stat(router.listenPath).st_ino, inode)
        agent = self.harness.startAgent(UID_A)
        agent.call("connectAndSend", path=router.listenPath, data=b64(lineRequest()))
        agent.begin("recvAll", timeout=20)
        router = self.manager.start()
        status, _, body = parseResponse(unb64(agent.reply()["head"]))
        self.assertEqual(status, 200, router.evidence())
        self.assertEqual(os.stat(router.listenPath).st_ino, inode)

    def test_aWaitingClientIsRoutedByTheNext(self):
        """
        A client the router has accepted but not yet relayed (its daemon's
        backlog is full) is handed over as it is, its request unread, and
        the next router routes it afresh and relays it.
        """
        full = self.harness.startBackend(UID_A, "backlogFull")
        router = self.manager.start(["--connect-timeout", "60"])
        before = router.descriptors().get("socket", 0)
        agent = self.harness.startAgent(UID_A)
        agent.call("connectAndSend", path=router.listenPath, data=b64(lineRequest()))
        agent.begin("recvAll", timeout=30)
        pollUntil(lambda: router.descriptors().get("socket", 0) > before, 10, what="the router to accept")
        self.manager.stop(router)
        router.waitLog("handed 0 connections and 1 waiting clients")
        full.kill()
        os.unlink(full.path)
        self.harness.startBackend(UID_A, "http")
        router = self.manager.start()
        router.waitLog("resumed 0 connections and 1 waiting clients")
        reply = agent.reply()
        self.assertEqual(reply["error"], None)
        status, _, body = parseResponse(unb64(reply["head"]))
        self.assertEqual(status, 200, router.evidence())
        agent.call("close")
        self.assertEqual(router.connectionDone(agent.pid)["end"], "closed")
