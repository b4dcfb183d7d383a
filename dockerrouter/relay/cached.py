"""
Opening a user's socket path on the reactor thread, where the kernel
promises it can't wait: the common connection costs no thread hop.

A look at a path a user chose can hang (a FUSE lookup that never answers, a
hung NFS home) or cost seconds (piles of long symbolic links), so such
looks run in the workers (L{dockerrouter.relay.workers}).  But nearly every
connection goes to a socket such as C{/run/user/UID/docker.sock}: a short
path without links, on a local file system, every component in the
kernel's cache.  For that path L{CachedOpener} asks the kernel with
C{openat2(2)}:

  - C{RESOLVE_CACHED} (Linux 5.12): the lookup is answered from the
    dentry cache, in its lock-free walk, or fails with C{EAGAIN}; any
    I/O or revalidation (FUSE, NFS, autofs) fails instead of waiting;
  - C{RESOLVE_NO_SYMLINKS}: no link is followed, so the walk is the
    components of the configured path and nothing a user can pile up;

then C{statx(2)} with C{AT_STATX_DONT_SYNC} (no round trip to a server)
says which mount the socket is on, and only a mount whose file system type
(from C{/proc/self/mountinfo}: the router's own table, not a question to
the file system) answers from memory (L{LOCAL}) may go on to the connect
on the reactor.  Everything else raises L{NotCached}, and the caller hands
the whole attempt to a worker.  What is checked and connected is the same
as there: the file the descriptor pins (see L{dockerrouter.relay.sockets.reach}).
"""

import ctypes
import errno
import os
import struct
from typing import Callable, Optional

# File systems whose lookups, attributes and permission checks are answered
# from memory once the dentry is cached: no server, no daemon in user space.
LOCAL = frozenset({"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"})

# <linux/openat2.h>; openat2 has the same number on every architecture.
_SYS_OPENAT2 = 437
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_CACHED = 0x20
_AT_FDCWD = -100
# <linux/stat.h>
_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_STATX_BASIC_STATS = 0x7FF
_STATX_MNT_ID = 0x1000
# struct statx: the fields read here, and where they are.
_HEAD = struct.Struct("=I4xQI")  # stx_mask, stx_attributes, stx_nlink (from 0)
_IDS = struct.Struct("=IIH")  # stx_uid, stx_gid, stx_mode (from 20)
_INO = struct.Struct("=Q")  # stx_ino (from 32)
_DEV = struct.Struct("=IIQ")  # stx_dev_major, stx_dev_minor, stx_mnt_id (from 136)
# Errors that are the kernel's answer about the path, cache or not.
_ANSWERS = frozenset({errno.ENOENT, errno.ENOTDIR})
# How often an unknown mount may make the table be read again.
_REREAD_INTERVAL = 1.0


class NotCached(Exception):
    """The kernel can't answer without waiting: ask a worker."""


def readMounts(path: str = "/proc/self/mountinfo") -> dict[int, str]:
    """Mount ids and their file system types, as C{proc(5)} lists them."""
    mounts = {}
    with open(path, "rb") as f:
        for line in f:
            fields = line.split()
            try:
                mounts[int(fields[0])] = fields[fields.index(b"-") + 1].decode("ascii", "replace")
            except (ValueError, IndexError):
                continue
    return mounts


class CachedOpener:
    """
    Opens a path C{O_PATH} on the reactor thread only where the kernel
    promises not to wait (see the module's docstring); otherwise raises
    L{NotCached}.  On a kernel without C{openat2}'s C{RESOLVE_CACHED} or
    C{statx}'s mount id, every path goes to the workers.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        mounts: Callable[[], dict[int, str]] = readMounts,
    ) -> None:
        self._clock = clock
        self._readMounts = mounts
        self._mounts: dict[int, str] = {}
        self._readAt = float("-inf")
        self._libc: Optional[ctypes.CDLL] = None
        self._how = ctypes.create_string_buffer(
            struct.pack("=QQQ", os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_CACHED | _RESOLVE_NO_SYMLINKS), 24
        )
        self._statx = ctypes.create_string_buffer(256)
        self.available = self._probe()

    def _probe(self) -> bool:
        """Whether this kernel and C library have what a cached open needs."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            libc.statx  # glibc 2.28
        except (OSError, AttributeError):
            return False
        self._libc = libc
        try:
            fd = self._openat2("/")
        except OSError:
            return False  # ENOSYS before 5.6, EINVAL for RESOLVE_CACHED before 5.12
        try:
            return self._mountOf(fd) is not None
        finally:
            os.close(fd)

    def __call__(self, path: str) -> tuple[int, os.stat_result]:
        """
        A descriptor (the caller's to close) of what C{path} leads to, and
        its C{stat}, with the same meaning as
        L{openSocketFile<dockerrouter.relay.sockets.openSocketFile>}.

        @raise NotCached: when only a worker may look.
        @raise OSError: ENOENT or ENOTDIR, the kernel's answer from its cache.
        """
        if not self.available:
            raise NotCached()
        try:
            fd = self._openat2(path)
        except OSError as e:
            if e.errno in _ANSWERS:
                raise
            raise NotCached() from None  # EAGAIN, ELOOP (a link), EXDEV, ...
        try:
            target = self._localStat(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, target

    def _openat2(self, path: str) -> int:
        assert self._libc is not None
        fd = self._libc.syscall(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), self._how, ctypes.c_size_t(24))
        if fd < 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number), path)
        return int(fd)

    def _mountOf(self, fd: int) -> Optional[int]:
        """The mount id of C{fd} (C{None} where C{statx} won't tell), read without a round trip."""
        assert self._libc is not None
        buf = self._statx
        if self._libc.statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, _STATX_BASIC_STATS | _STATX_MNT_ID, buf) < 0:
            return None
        mask = _HEAD.unpack_from(buf, 0)[0]
        if not mask & _STATX_MNT_ID:
            return None
        return int(_DEV.unpack_from(buf, 136)[2])

    def _localStat(self, fd: int) -> os.stat_result:
        """
        The C{stat} of C{fd} as C{os.stat_result}, if it is on a L{LOCAL}
        file system.

        @raise NotCached: elsewhere.
        """
        mount = self._mountOf(fd)
        if mount is None or self._fileSystem(mount) not in LOCAL:
            raise NotCached()
        buf = self._statx
        _, _, nlink = _HEAD.unpack_from(buf, 0)
        uid, gid, mode = _IDS.unpack_from(buf, 20)
        (ino,) = _INO.unpack_from(buf, 32)
        major, minor, _ = _DEV.unpack_from(buf, 136)
        return os.stat_result((mode, ino, os.makedev(major, minor), nlink, uid, gid, 0, 0, 0, 0))

    def _fileSystem(self, mount: int) -> Optional[str]:
        """
        The type of C{mount}; the table is read again for a mount it lacks,
        at most once a second (a user can mount FUSE file systems at will).
        """
        kind = self._mounts.get(mount)
        if kind is None and self._clock() >= self._readAt + _REREAD_INTERVAL:
            self._readAt = self._clock()
            try:
                self._mounts = self._readMounts()
            except OSError:
                self._mounts = {}
            kind = self._mounts.get(mount)
        return kind
