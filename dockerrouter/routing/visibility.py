"""
What a user could see of a path for themselves.

The router opens paths as root, so what it meets there is not the user's to
know: that C{/root/.bashrc} exists, or that a path in another user's 0700
directory is a socket.  L{look} walks a path again, as the kernel would for
the user (search permission on every directory, by the mode bits, for their
uid, primary gid and supplementary groups), and reports only what that walk
could reach.  It runs whenever a reason about a path is to be told to a
client: on every refusal, and for every missing candidate of a chain
before the next is tried.  It looks at paths users chose (a hung NFS home,
a FUSE mount that never answers), so it runs in a worker thread, with a
deadline (see L{dockerrouter.relay.workers}), and ends after so many links and
components.
"""

import os
import stat
from collections import deque
from typing import Optional, Union

from attrs import frozen

# Symbolic links followed before giving up, as the kernel's MAXSYMLINKS.
_MAX_LINKS = 40
# Components walked in all (links' targets included) before giving up: the
# kernel's own walk ends at 40 links of at most PATH_MAX (4096) bytes each;
# this one ends sooner, at about one PATH_MAX of components.
_MAX_STEPS = 4096
_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

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
    (a directory they can't search, a loop, too long a walk, a file where
    a directory should be, anything under /proc).

    Each step looks from a descriptor of the directory reached, so that a
    step costs the same however deep the walk is (a path given again from
    C{/} each time would make a deep tree cost its depth squared).
    """
    # Each component with the link whose target it came from.
    parts: deque = deque((name, None) for name in path.split("/"))
    current = "/"
    directory = os.open("/", _DIRECTORY)
    links = steps = 0
    found: Optional[os.stat_result] = None
    try:
        while parts:
            name, link = parts.popleft()
            if name in ("", "."):
                continue
            steps += 1
            if steps > _MAX_STEPS:
                return None
            here = os.fstat(directory)
            if not stat.S_ISDIR(here.st_mode) or not viewer.canSearch(here):
                return None
            if name == "..":
                current = os.path.dirname(current)
                directory = _enter(directory, "..")
                found = None
                continue
            candidate = os.path.join(current, name)
            try:
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                return Missing(candidate, link)
            if _onProc(st):
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    return None
                target = os.readlink(name, dir_fd=directory)
                followed = (candidate, target)
                parts.extendleft(reversed([(part, followed) for part in target.split("/")]))
                if target.startswith("/"):
                    current = "/"
                    directory = _enter(directory, "/")
                found = None
                continue
            current = candidate
            found = st
            if parts:
                directory = _enter(directory, name)
        if found is None:
            found = os.fstat(directory)
        return Found(found.st_dev, found.st_ino)
    except OSError:
        return None
    finally:
        os.close(directory)


def _enter(directory: int, name: str) -> int:
    """
    A descriptor of C{name} (not followed if a link) in C{directory}, which
    is closed: the walk holds one descriptor at a time.
    """
    try:
        return os.open(name, _DIRECTORY, dir_fd=directory)
    except NotADirectoryError:
        # A file where a directory should be: the next step says so.
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    finally:
        os.close(directory)
