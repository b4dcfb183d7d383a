"""
What the router tells its operator: the one record per finished connection,
and how log levels reach syslog.

Under C{twistd --syslog}, Twisted's syslog observer sends every error as
LOG_ALERT and everything else as LOG_INFO, to the "user" facility, unless an
event carries C{syslogPriority} and C{syslogFacility}; L{RouterLogger} adds
both, so warnings arrive as LOG_WARNING in the daemon facility.
"""

import syslog
from typing import Any, Optional

from twisted.logger import Logger, LogLevel

SYSLOG_PRIORITIES = {
    LogLevel.debug: syslog.LOG_DEBUG,
    LogLevel.info: syslog.LOG_INFO,
    LogLevel.warn: syslog.LOG_WARNING,
    LogLevel.error: syslog.LOG_ERR,
    LogLevel.critical: syslog.LOG_CRIT,
}

CONNECTION_DONE = (
    "connection done: uid={uid} user={user} pid={pid} backend={backend} "
    "duration={duration:.3f}s to_docker={bytesToDocker} "
    "from_docker={bytesFromDocker} end={end}"
)

REJECTED = (
    "rejected uid={uid} user={user} pid={pid} backend={backend} "
    "cause={cause}: {message}"
)


def emitFormatted(log: Logger, level: LogLevel, format: str, **fields: Any) -> None:
    """
    Emit an event whose text is made here, with C{str.format}, and which
    still carries every field by name.  Twisted's own formatter parses the
    format string anew for every event in pure Python, which for the
    per-connection record costs more than relaying a small request.
    """
    log.emit(level, "{text}", text=format.format(**fields), **fields)


class RouterLogger(Logger):
    """
    A L{Logger} whose events carry their syslog priority and facility.
    """

    def emit(
        self, level: LogLevel, format: Optional[str] = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("syslogPriority", SYSLOG_PRIORITIES[level])
        kwargs.setdefault("syslogFacility", syslog.LOG_DAEMON)
        super().emit(level, format, **kwargs)
