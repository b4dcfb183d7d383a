"""
What a user could see of a path for themselves.

The router opens paths as root, so what it meets there is not the user's to
know: that C{/root/.bashrc} exists, or that a path in another user's 0700
directory is a socket.  L{look} walks a path again, as the kernel would for
the user (search permission on every directory, by the mode bits, for their
uid, primary gid and supplementary groups), and reports only what that walk
could reach.  It runs on the error path only.
"""

import os
import stat
from collections import deque
from typing import Optional, Union

from attrs import frozen

# Symbolic links followed before giving up, as the kernel's MAXSYMLINKS.
_MAX_LINKS = 40

_procDevice: Optional[int] = None


@frozen
class Viewer:
    """The credentials a path is judged with."""

    uid: int
    gids: frozenset[int]

    def canSearch(self, directory: os.stat_result) -> bool:
        if self.uid == 0:
            return True
        if directory.st_uid == self.uid:
            bit = stat.S_IXUSR
        elif directory.st_gid in self.gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        return bool(directory.st_mode & bit)


@frozen
class Found:
    """The path leads to this file (device and inode, as C{stat} says)."""

    dev: int
    ino: int


@frozen
class Missing:
    """
    Nothing at C{where}, in a directory the user can search.

    @ivar link: the symbolic link whose target named C{where}, as (the
        link's path, its target as written), or C{None}.
    """

    where: str
    link: Optional[tuple[str, str]] = None


def _onProc(st: os.stat_result) -> bool:
    """
    /proc's links are not what C{readlink} says (C{/proc/PID/root} is the
    root of another mount namespace): nothing under it is judged.
    """
    global _procDevice
    if _procDevice is None:
        _procDevice = os.stat("/proc").st_dev
    return st.st_dev == _procDevice


def look(path: str, viewer: Viewer) -> Union[Found, Missing, None]:
    """
    Walk C{path} as C{viewer}: what they would find there (following
    links), that nothing is there, or C{None} when they could not tell
    (a directory they can't search, a loop, a file where a directory
    should be, anything under /proc).
    """
    # Each component with the link whose target it came from.
    parts: deque = deque((name, None) for name in path.split("/"))
    current = "/"
    links = 0
    found: Optional[os.stat_result] = None
    while parts:
        name, link = parts.popleft()
        if name in ("", "."):
            continue
        try:
            directory = os.stat(current)
        except OSError:
            return None
        if not stat.S_ISDIR(directory.st_mode) or not viewer.canSearch(directory):
            return None
        if name == "..":
            current = os.path.dirname(current)
            found = None
            continue
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return Missing(candidate, link)
        except OSError:
            return None
        if _onProc(st):
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                return None
            target = os.readlink(candidate)
            followed = (candidate, target)
            parts.extendleft(reversed([(part, followed) for part in target.split("/")]))
            if target.startswith("/"):
                current = "/"
            found = None
            continue
        current = candidate
        found = st
    if found is None:
        try:
            found = os.stat(current)
        except OSError:
            return None
    return Found(found.st_dev, found.st_ino)
