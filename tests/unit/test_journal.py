"""
The journald observer, against a fake journal: a real datagram socket in a
temporary directory, its entries decoded as journald would.
"""

import os
import shutil
import socket
import struct
import tempfile

from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacyLog
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.service import journal
from dockerrouter.base.logging import CONNECTION_DONE, REJECTED, RouterLogger, emitFormatted


def decode(data: bytes) -> dict[str, str]:
    """A native-protocol entry as journald reads it."""
    fields = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            data = rest
        else:
            name = line
            (size,) = struct.unpack("<Q", rest[:8])
            value, data = rest[8 : 8 + size], rest[8 + size + 1 :]
        fields[name.decode()] = value.decode()
    return fields


class JournalTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="dr-journal-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "socket")
        self.journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.journal.close)
        self.journal.bind(path)
        self.journal.setblocking(False)
        self.observer = journal.JournalObserver(path)
        self.log = RouterLogger(observer=self.observer)

    def entries(self) -> list[dict[str, str]]:
        entries = []
        while True:
            try:
                entries.append(decode(self.journal.recv(1 << 20)))
            except BlockingIOError:
                return entries

    def test_prioritiesAndIdentity(self) -> None:
        """
        Each level at its own priority, the identifier and pid, no "[-] ".
        """
        self.log.info("i")
        self.log.warn("w")
        self.log.error("e")
        Logger(observer=self.observer).critical("c")
        entries = self.entries()
        self.assertEqual([(e["MESSAGE"], e["PRIORITY"]) for e in entries], [("i", "6"), ("w", "4"), ("e", "3"), ("c", "2")])
        for entry in entries:
            self.assertEqual(entry["SYSLOG_IDENTIFIER"], "docker-router")
            self.assertEqual(entry["SYSLOG_PID"], str(os.getpid()))

    def test_twistdsOwnLines(self) -> None:
        """
        twistd's lines (legacy C{log.msg}, and stderr written as errors, as a
        listen failure is) arrive as LOG_INFO and LOG_ERR.
        """
        globalLogPublisher.addObserver(self.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.observer)
        legacyLog.msg("twistd starting up")
        Logger(namespace="stderr").emit(LogLevel.error, "{log_io}", log_io="docker-router: cannot listen on x: y")
        entries = [e for e in self.entries() if e["MESSAGE"] in ("twistd starting up", "docker-router: cannot listen on x: y")]
        self.assertEqual([e["PRIORITY"] for e in entries], ["6", "3"])

    def test_connectionRecordFields(self) -> None:
        emitFormatted(
            self.log, LogLevel.info, CONNECTION_DONE,
            uid=1001, user="alice", pid=4711, backend="/run/user/1001/docker.sock",
            duration=0.4123, bytesToDocker=183, bytesFromDocker=2211, end="closed",
        )
        emitFormatted(
            self.log, LogLevel.warn, REJECTED,
            uid=1002, user="bob", pid=4712, backend="/run/user/1002/docker.sock",
            cause="missing", message="No Docker daemon",
        )
        done, rejected = self.entries()
        self.assertTrue(done["MESSAGE"].startswith("connection done: uid=1001 user=alice"))
        self.assertEqual(
            {k: v for k, v in done.items() if k.startswith("DOCKER_ROUTER_")},
            {
                "DOCKER_ROUTER_USER": "alice",
                "DOCKER_ROUTER_UID": "1001",
                "DOCKER_ROUTER_PID": "4711",
                "DOCKER_ROUTER_BACKEND": "/run/user/1001/docker.sock",
                "DOCKER_ROUTER_BYTES_TO_DOCKER": "183",
                "DOCKER_ROUTER_BYTES_FROM_DOCKER": "2211",
                "DOCKER_ROUTER_DURATION": "0.412",
                "DOCKER_ROUTER_END": "closed",
            },
        )
        self.assertEqual((rejected["DOCKER_ROUTER_CAUSE"], rejected["PRIORITY"]), ("missing", "4"))

    def test_multilineAndLong(self) -> None:
        """
        A traceback (newlines) is sent length-prefixed; a huge message is cut
        to fit a datagram.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("boom")
        self.log.info("{x}", x="y" * (1 << 20))
        failure, huge = self.entries()
        self.assertIn("ZeroDivisionError", failure["MESSAGE"])
        self.assertIn("\n", failure["MESSAGE"])
        self.assertEqual(len(huge["MESSAGE"]), journal.MAX_VALUE)

    def test_dropsAreCounted(self) -> None:
        """
        Entries journald has no room for are dropped without blocking, and
        the next entry that gets through is preceded by their count.
        """
        logged = 0
        while not self.observer.dropped:
            self.log.info("{x}", x="y" * journal.MAX_VALUE)
            logged += 1
        self.log.info("lost too")
        self.assertEqual(self.observer.dropped, 2)
        self.assertEqual(len(self.entries()), logged - 1)
        self.log.info("back")
        entries = self.entries()
        self.assertEqual(
            [(e["MESSAGE"], e["PRIORITY"]) for e in entries],
            [("2 log entries could not be sent to journald (its queue was full, or an entry too large) and were dropped", "4"), ("back", "6")],
        )

    def test_underJournal(self) -> None:
        st = os.fstat(2)
        self.assertTrue(journal.underJournal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}))
        self.assertFalse(journal.underJournal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}))
        self.assertFalse(journal.underJournal({}))


class InstalledNameTests(SynchronousTestCase):
    def test_unitFilesName(self) -> None:
        """
        C{--logger=dockerrouter.journal.observer}, which installed unit files
        give twistd, still names the journal observer.
        """
        from dockerrouter.journal import observer

        self.assertIs(observer, journal.observer)
