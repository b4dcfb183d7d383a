"""
Which user owns the user namespace a socket's peer runs in.

A uid in a user's subordinate range proves nothing by itself: a real account
can have that number (hosts with SSSD or AD id mapping hand out uids of
200000 and more).  A process of a user's rootless container is one that
runs inside a user namespace that user created; the kernel records the
creator as the namespace's owner.  L{outermostOwner} reads it for the
process at the other end of a connection, without trusting a pid that may
have been reused.

Reading another process's namespace needs C{CAP_SYS_PTRACE} (the kernel's
ptrace access check); without it every answer is "no proof".
"""

import errno
import fcntl
import os
import select
import socket
import struct
import time
from typing import Optional

from dockerrouter.base.logging import RouterLogger

log = RouterLogger()
# Not in Python 3.11's socket module (Linux 6.5).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
# <linux/pidfd.h>: _IO(PIDFS_IOCTL_MAGIC 0xFF, 9) (Linux 6.11).
PIDFD_GET_USER_NAMESPACE = 0xFF09
# <linux/nsfs.h>: _IO(NSIO 0xb7, 2) and _IO(NSIO, 4).
NS_GET_PARENT = 0xB702
NS_GET_OWNER_UID = 0xB704

_INT = struct.Struct("i")
_UID = struct.Struct("I")
# Errors that mean "this kernel has no such thing", as opposed to "no".
_UNSUPPORTED = (errno.ENOPROTOOPT, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)

_ours: Optional[tuple[int, int]] = None
_warnedDenied = False


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _ownNamespace() -> tuple[int, int]:
    """The router's own user namespace, the top of every walk."""
    global _ours
    if _ours is None:
        st = os.stat("/proc/self/ns/user")
        _ours = (st.st_dev, st.st_ino)
    return _ours


def outermostOwner(sock: socket.socket, pid: int) -> Optional[int]:
    """
    The uid owning the outermost user namespace, below the router's own,
    that the peer of C{sock} (pid C{pid}) runs in; C{None} when the peer
    runs in the router's namespace, or when that can't be known (the
    process is gone, the kernel or the sandbox won't tell).

    Only a client whose uid falls in a subordinate range pays for this: a
    few system calls.
    """
    try:
        namespace = _peerNamespace(sock, pid)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            _warnDenied(e.errno)
        return None
    try:
        return _walkUp(namespace)
    finally:
        os.close(namespace)


def _warnDenied(number: int) -> None:
    """Say once that no client's namespace can be read, and what it costs."""
    global _warnedDenied
    if not _warnedDenied:
        _warnedDenied = True
        log.warn(
            "cannot read the user namespace of clients ({error}; is CAP_SYS_PTRACE "
            "missing?): processes in rootless containers are routed as their own uid",
            error=os.strerror(number),
        )


def _walkUp(namespace: int) -> Optional[int]:
    """
    Owner of the ancestor of C{namespace} (a descriptor, closed by the
    caller) whose parent is the router's namespace.
    """
    top = _ownNamespace()
    if _identity(namespace) == top:
        return None
    current = namespace
    try:
        while True:
            try:
                parent = fcntl.ioctl(current, NS_GET_PARENT)
            except OSError:
                # EPERM: an ancestor outside the router's namespace, so the
                # client is not below it.
                return None
            if _identity(parent) == top:
                os.close(parent)
                owner = bytearray(_UID.size)
                fcntl.ioctl(current, NS_GET_OWNER_UID, owner)
                return _UID.unpack(owner)[0]
            if current != namespace:
                os.close(current)
            current = parent
    except OSError:
        return None
    finally:
        if current != namespace:
            os.close(current)


def _peerNamespace(sock: socket.socket, pid: int) -> int:
    """
    A descriptor of the peer's user namespace.  Where the kernel has them,
    from the pidfd the kernel recorded at connect (C{SO_PEERPIDFD}), which
    can't name another process; else from C{/proc/<pid>}, checked to still
    be the process that connected.
    """
    try:
        (pidfd,) = _INT.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, _INT.size))
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        return _fromProcWithoutPidfd(pid)
    try:
        try:
            return fcntl.ioctl(pidfd, PIDFD_GET_USER_NAMESPACE)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
        return _fromProc(pid, pidfd)
    finally:
        os.close(pidfd)


def _fromProc(pid: int, pidfd: int) -> int:
    """
    C{/proc/<pid>/ns/user}, kept only if the process C{pidfd} names is
    still alive after it was opened: a pid is reused only once its process
    is gone, so then C{/proc/<pid>} was that process.
    """
    namespace = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    # A pidfd polls readable once its process has exited.  (poll, not
    # select: the router's descriptors run far past select's 1024.)
    exited = select.poll()
    exited.register(pidfd, select.POLLIN)
    if exited.poll(0):
        os.close(namespace)
        raise OSError(errno.ESRCH, "the connecting process has exited")
    return namespace


def _fromProcWithoutPidfd(pid: int) -> int:
    """
    For kernels before 6.5: pin the pid with C{pidfd_open}, and accept it
    only if that process started before the connection was accepted (now,
    give or take a clock tick); a process started later reused the pid.
    """
    acceptedAt = time.clock_gettime(time.CLOCK_BOOTTIME)
    pidfd = os.pidfd_open(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22, counted after the command name (which may hold spaces).
            fields = f.read().rsplit(b")", 1)[1].split()
        startedAt = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if startedAt > acceptedAt:
            raise OSError(errno.ESRCH, "the pid names a process started later")
        return _fromProc(pid, pidfd)
    finally:
        os.close(pidfd)
