"""
Log to journald in its native protocol: every line at its own priority,
with the router's identifier and pid, and the per-connection record's
fields queryable (C{journalctl DOCKER_ROUTER_USER=alice}).

twistd installs it with C{--logger=dockerrouter.journal.observer} (the
systemd unit does).  Off systemd, the same option logs text to standard
output, as twistd would; without it, twistd's own C{--logfile} and
C{--syslog} work as ever.
"""

import os
import socket
import struct
import sys
from typing import Any, Mapping, Optional

from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsText,
    textFileLogObserver,
)
from zope.interface import implementer

from dockerrouter.base.logging import SYSLOG_PRIORITIES

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "docker-router"

# A datagram must fit the socket's send buffer; longer messages are cut
# (sd_journal_send would pass them through a memfd instead).
MAX_VALUE = 48 * 1024
# Characters that can't make more than MAX_VALUE bytes of UTF-8.
_SHORT = MAX_VALUE // 4

# Event fields of the connection record (see L{dockerrouter.base.logging}) and
# their journal field names.
FIELDS = {
    "user": "DOCKER_ROUTER_USER",
    "uid": "DOCKER_ROUTER_UID",
    "pid": "DOCKER_ROUTER_PID",
    "backend": "DOCKER_ROUTER_BACKEND",
    "bytesToDocker": "DOCKER_ROUTER_BYTES_TO_DOCKER",
    "bytesFromDocker": "DOCKER_ROUTER_BYTES_FROM_DOCKER",
    "duration": "DOCKER_ROUTER_DURATION",
    "end": "DOCKER_ROUTER_END",
    "cause": "DOCKER_ROUTER_CAUSE",
}


def encode(fields: Mapping[str, object]) -> bytes:
    """
    One journal entry in the native protocol: C{NAME=value} lines, and a
    value holding a newline as its name, a newline, its length (64-bit
    little-endian) and its bytes.
    """
    values = [str(value) for value in fields.values()]
    if not any("\n" in value or len(value) > _SHORT for value in values):
        # The usual entry (the connection record): encoded in one go.
        return "".join(f"{name}={value}\n" for name, value in zip(fields, values)).encode("utf-8", "replace")
    parts = []
    for name, value in fields.items():
        data = str(value).encode("utf-8", "replace")[:MAX_VALUE]
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


@implementer(ILogObserver)
class JournalObserver:
    """
    Sends each event to journald as one entry.  The socket never blocks
    the reactor: an entry journald has no room for is dropped, and the
    next entry that gets through is preceded by how many were.
    """

    dropped = 0

    def __init__(self, path: str = JOURNAL_SOCKET, pid: Optional[int] = None) -> None:
        self._path = path
        self._pid = pid
        self._socket = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )

    def fields(self, event: dict[str, Any]) -> dict[str, object]:
        level = event.get("log_level", LogLevel.info)
        if event.get("log_format") == "{text}" and "text" in event and "log_failure" not in event:
            message = event["text"]  # made by emitFormatted: no need to format it again
        else:
            message = eventAsText(event, includeTimestamp=False, includeSystem=False) or ""
        fields: dict[str, object] = {
            "MESSAGE": message.rstrip("\n"),
            "PRIORITY": event.get("syslogPriority", SYSLOG_PRIORITIES.get(level, 6)),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            # Read per event: twistd may fork after the observer is made.
            "SYSLOG_PID": self._pid or os.getpid(),
            "SYSLOG_FACILITY": 3,  # daemon
        }
        for name, field in FIELDS.items():
            if name in event:
                value = event[name]
                fields[field] = f"{value:.3f}" if name == "duration" else value
        return fields

    def __call__(self, event: dict[str, Any]) -> None:
        if self.dropped:
            dropped = {"log_level": LogLevel.warn, "log_format": "{dropped} log entries could not be sent to journald (its queue was full, or an entry too large) and were dropped", "dropped": self.dropped}
            if not self._send(dropped):
                self.dropped += 1
                return
            self.dropped = 0
        if not self._send(event):
            self.dropped += 1

    def _send(self, event: dict[str, Any]) -> bool:
        try:
            self._socket.sendto(encode(self.fields(event)), self._path)
        except OSError:
            return False  # journald is gone, or its queue is full
        return True


def underJournal(environ: Mapping[str, str] = os.environ) -> bool:
    """
    Whether standard error goes to the journal (C{$JOURNAL_STREAM} names its
    device and inode, as systemd sets it for C{StandardError=journal}).
    """
    try:
        device, inode = (int(n) for n in environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def observer() -> ILogObserver:
    """
    The log observer factory for C{twistd --logger}: the journal under
    systemd, text on standard output otherwise.
    """
    if underJournal() and os.path.exists(JOURNAL_SOCKET):
        return JournalObserver()
    return textFileLogObserver(sys.stdout)
