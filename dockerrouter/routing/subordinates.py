"""
Subordinate id ranges (C{subuid(5)}, C{subgid(5)}): one parser, which both
the router (L{SubordinateIds}, whose ranges route a user's container
processes to them) and C{docker-router doctor} read the files with.
"""

import bisect
import os
import pwd
from typing import Callable, Iterator, NamedTuple, Optional, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from dockerrouter.routing.rules import NeedLookup


class SubordinateRange(NamedTuple):
    """One line of a subordinate id file: C{name:start:size}."""

    name: str
    start: int
    size: int
    # Where it is, for warnings: its line number and the line as written.
    line: int
    text: str


def subordinateRanges(path: str, warn: Callable[[str], None]) -> Iterator[SubordinateRange]:
    """
    The ranges of the file at C{path} (none when it can't be read), in the
    file's order.  Blank and C{#} lines are skipped; a broken line, or one
    that is not a positive range, is reported through C{warn} as it is
    reached, so that a caller's own warnings about a line come in line order.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            name, first, size = line.strip().split(":")
            start, count = int(first), int(size)
            if start <= 0 or count <= 0:
                raise ValueError("not a positive range")
        except ValueError as e:
            warn(_ignored(path, number, e, line))
            continue
        yield SubordinateRange(name, start, count, number, line)


def _ignored(path: str, number: int, why: Exception, line: str) -> str:
    return f"{path}:{number}: ignored ({why}): {line!r}"


def loginDefsUidMin(path: str = "/etc/login.defs", default: int = 1000) -> int:
    """
    C{UID_MIN} of C{login.defs(5)}: the lowest uid of a regular account.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "UID_MIN" and fields[1].isdigit():
                    return int(fields[1])
    except OSError:
        pass
    return default


class SubordinateIds:
    """
    The owners of the subordinate uid ranges in C{/etc/subuid}, re-read when
    the file changes.

    Inside a user's rootless container, root is the user and every other uid
    is one of their subordinate ids; those processes belong to that user's
    daemon.  Lines that are broken, name an unknown user, belong to root or
    a system account (below C{uidMin}: Proxmox and LXD give root ranges,
    and no client may be sent to root's socket this way) or overlap another
    range (an id claimed twice has no owner we could trust) are ignored,
    each with a warning from C{warn} when the file is read.  uid 0 never
    maps to anyone.

    The file is looked at (one C{stat}) at most once a second, not on every
    connection.
    """

    checkInterval = 1.0

    def __init__(
        self,
        path: str,
        warn: Callable[[str], None],
        clock: Callable[[], float],
        uidMin: int = 1000,
        inThread: Optional[Callable[..., Deferred]] = None,
    ) -> None:
        """
        @param inThread: runs a call off the reactor thread (the router's):
            the names in the file are looked up in the user database, which
            may be LDAP and may hang.  The ranges read last stand while the
            file is read again; until the first read is done, L{owner}
            raises L{NeedLookup}.  Without it (tools, tests) the file is
            read at once.
        """
        self.path = path
        self.uidMin = uidMin
        self._warn = warn
        self._clock = clock
        self._inThread = inThread
        self._reading: Optional[Deferred] = None
        # Whether the file has been read once; who waits for that.
        self._read = False
        self._waiting: list[Deferred] = []
        self._nextCheck = float("-inf")
        self._stamp: Optional[tuple] = None
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, int]] = []

    def owner(self, uid: int) -> int:
        """
        The uid that owns C{uid}: its range's owner, or C{uid} itself.

        @raise NeedLookup: while the file is read for the first time.
        """
        if uid == 0:
            return uid
        self._refresh()
        if not self._read and self._reading is not None:
            raise NeedLookup(self._whenRead())
        i = bisect.bisect_right(self._starts, uid) - 1
        if i >= 0:
            start, count, owner = self._ranges[i]
            if uid < start + count:
                return owner
        return uid

    def reload(self) -> Union[str, Deferred]:
        """
        Read the file now, changed or not (SIGHUP); say what was read (a
        Deferred of it, when read off the reactor thread).
        """
        if self._reading is not None:
            # Read again once the read in flight is done.
            return self._whenRead().addCallback(lambda _: self.reload())
        self._nextCheck = float("-inf")
        self._stamp = None
        self._refresh()
        if self._reading is None:
            return self._said()
        return self._whenRead().addCallback(lambda _: self._said())

    def _said(self) -> str:
        return f"{len(self._ranges)} subordinate uid ranges from {self.path}"

    def _whenRead(self) -> Deferred:
        """Fires when the read in flight is done."""
        waiter: Deferred = Deferred()
        self._waiting.append(waiter)
        return waiter

    def _refresh(self) -> None:
        now = self._clock()
        if now < self._nextCheck or self._reading is not None:
            return
        self._nextCheck = now + self.checkInterval
        if self._inThread is None:
            self._apply(self._readFile(self._stamp))
            return
        self._reading = self._inThread(self._readFile, self._stamp)
        self._reading.addCallbacks(self._apply, self._failed)

    def _readFile(
        self, stamp: Optional[tuple]
    ) -> Optional[tuple[Optional[tuple], list[tuple[int, int, int]], list[str]]]:
        """
        The file's stamp, ranges and warnings, or C{None} when it is
        unchanged since C{stamp}.  (It may ask LDAP: called off the reactor.)
        """
        try:
            st = os.stat(self.path)
            now: Optional[tuple] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            now = None
        if now == stamp and self._read:
            return None
        warnings: list[str] = []
        return now, self._owned(warnings.append), warnings

    def _apply(self, read: Optional[tuple[Optional[tuple], list[tuple[int, int, int]], list[str]]]) -> None:
        if read is not None:
            self._stamp, self._ranges, warnings = read
            self._starts = [start for start, _, _ in self._ranges]
            for warning in warnings:
                self._warn(warning)
        self._readDone()

    def _failed(self, failure: Failure) -> None:
        """A read that failed (the user database): the last ranges stand."""
        self._warn(f"{self.path}: not read ({failure.getErrorMessage()}); the last ranges read stand")
        self._readDone()

    def _readDone(self) -> None:
        self._reading = None
        self._read = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def _owned(self, warn: Callable[[str], None]) -> list[tuple[int, int, int]]:
        """
        The file's (start, count, owner uid) ranges that route anyone: not
        broken, of a known user, not below C{uidMin}, overlapping no other.
        """
        ranges: list[tuple[int, int, int, int]] = []
        for found in subordinateRanges(self.path, warn):
            name = found.name
            try:
                owner = int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
            except KeyError as e:
                warn(_ignored(self.path, found.line, e, found.text))
                continue
            ranges.append((found.start, found.size, owner, found.line))
        ignored = {}
        for number in _overlapping(ranges):
            ignored[number] = "its range overlaps another"
        for _, _, owner, number in ranges:
            if owner < self.uidMin and number not in ignored:
                ignored[number] = f"owned by uid {owner}, below UID_MIN {self.uidMin}"
        for number, why in sorted(ignored.items()):
            warn(f"{self.path}:{number}: ignored ({why})")
        return sorted((s, c, o) for s, c, o, n in ranges if n not in ignored)


def _overlapping(ranges: list[tuple[int, int, int, int]]) -> set[int]:
    """
    The line numbers of the (start, count, owner, line) ranges that overlap
    any other: sorted by start, ranges that overlap one another chain into
    runs, and every range of a run of two or more overlaps some other one
    (nested or chained, not just its neighbour).
    """
    overlapping: set[int] = set()
    run: list[int] = []
    end = 0
    for start, count, _, number in sorted(ranges):
        if run and start < end:
            run.append(number)
        else:
            if len(run) > 1:
                overlapping.update(run)
            run = [number]
        end = max(end, start + count) if len(run) > 1 else start + count
    if len(run) > 1:
        overlapping.update(run)
    return overlapping

