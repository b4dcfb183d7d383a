"""
twistd's file log (C{--logfile}, or standard output with C{-n}) made cheaper
for the router's records: a formatter that does per second what Twisted's
does per line, and writes held for a batch of records (see
L{HeldWrites<dockerrouter.base.logging.HeldWrites>}).
"""

from typing import Optional

from twisted.application.service import Service
from twisted.logger import (
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)

from dockerrouter.base._compat import keepDeviceInPlace, textFileObservers, wrapOutFile
from dockerrouter.base.logging import HeldWrites


class ClassicText:
    """
    Twisted's classic log line (C{formatEventAsClassicLogText}), made
    cheaper for the router's records: the timestamp is formatted once a
    second rather than per line (with Twisted's own C{formatTime}), and an
    event whose text L{emitFormatted} has made is not formatted again.
    The lines are the same, character for character.
    """

    def __init__(self, timeFormat: Optional[str] = timeFormatRFC3339) -> None:
        self._timeFormat = timeFormat
        self._second: Optional[int] = None
        self._stamp = ""

    def formatTime(self, when: Optional[float]) -> str:
        if when is None or self._timeFormat is None:
            return formatTime(when, self._timeFormat)
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(second, self._timeFormat)
        return self._stamp

    def __call__(self, event: dict) -> Optional[str]:
        if event.get("log_format") != "{text}" or "log_failure" in event or "text" not in event:
            return formatEventAsClassicLogText(event, formatTime=self.formatTime)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        text = event["text"]
        if not text:
            return None
        line = f"{self.formatTime(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def speedUpFileLogs(publisher: LogPublisher = globalLogPublisher) -> int:
    """
    Give the file observers twistd made (C{--logfile}, or standard output
    with C{-n}) a L{ClassicText} formatter, and a file that writes a batch
    of records at once (L{HeldWrites}); a log "file" that is a device is
    never rotated (L{keepDeviceInPlace}).  Syslog and other observers are
    left alone.

    @return: how many were changed.
    """
    observers = textFileObservers(publisher)
    for observer in observers:
        observer.formatEvent = ClassicText()
        wrapOutFile(observer, lambda file: HeldWrites(keepDeviceInPlace(file)))
    return len(observers)


class FileLogsService(Service):
    """Once twistd has begun logging, makes its file log lines cheaper."""

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        speedUpFileLogs()
