"""
Which user namespace a socket's peer runs in, and who owns it.

A uid in a user's subordinate range proves nothing by itself: a real account
can have that number (hosts with SSSD or AD id mapping hand out uids of
200000 and more).  A process of a user's rootless container is one that
runs inside a user namespace that user created; the kernel records the
creator as the namespace's owner.  And groups the kernel reports for a peer
in a namespace of its own may be ones it mapped there itself.
L{namespaceOf} reads where the process at the other end of a connection
runs, without trusting a pid that may have been reused.

Reading another process's namespace needs C{CAP_SYS_PTRACE} (the kernel's
ptrace access check); without it every answer is "no proof".
"""

import errno
import fcntl
import os
import select
import socket
import struct
from typing import Optional

from dockerrouter.base.logging import RouterLogger
from dockerrouter.routing.credentials import Credentials

log = RouterLogger()
# Not in Python 3.11's socket module (Linux 6.5).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
# <linux/pidfd.h>: _IO(PIDFS_IOCTL_MAGIC 0xFF, 9) (Linux 6.11).
PIDFD_GET_USER_NAMESPACE = 0xFF09
# <linux/nsfs.h>: _IO(NSIO 0xb7, 2) and _IO(NSIO, 4).
NS_GET_PARENT = 0xB702
NS_GET_OWNER_UID = 0xB704
# <linux/sock_diag.h>, <linux/unix_diag.h> (sock_diag(7)).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
UDIAG_SHOW_PEER = 0x04
UNIX_DIAG_PEER = 2

# What L{namespaceOf} answers for a peer in the router's own namespace (no
# uid is negative).
ROUTERS = -1

_INT = struct.Struct("i")
_UID = struct.Struct("I")
# struct nlmsghdr, then struct unix_diag_req: family, protocol, pad,
# states, inode, what to show, cookie (none: ~0, ~0).
_DIAG_REQUEST = struct.Struct("=IHHIIBBHIIIII")
_NLMSG_HEADER = struct.Struct("=IHHII")
_NLMSG_ERROR = 2
# struct unix_diag_msg, after the header; then attributes.
_DIAG_MESSAGE_SIZE = 16
_ATTRIBUTE = struct.Struct("=HH")
# Errors that mean "this kernel has no such thing", as opposed to "no".
_UNSUPPORTED = (errno.ENOPROTOOPT, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)
# A holder's descriptors looked through for the connection, at most.
_MOST_DESCRIPTORS = 4096

_ours: Optional[tuple[int, int]] = None
_warnedDenied = False
# Whether this kernel can prove which process holds a connection (None:
# not found out yet; see L{provable}).
_provable: Optional[bool] = None


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


def namespaceOf(
    sock: socket.socket, client: Credentials, groups: Optional[frozenset[int]] = None
) -> Optional[int]:
    """
    Where the peer of C{sock} (C{client}, as C{SO_PEERCRED} told) runs:
    L{ROUTERS} for the router's own user namespace, else the uid owning
    the outermost user namespace below the router's; C{None} when that
    can't be known (the process is gone, the kernel or the sandbox won't
    tell).

    Only a client whose uid falls in a subordinate range, or every client
    when rules match groups, pays for this: a few system calls.

    @param groups: the groups (primary gid included) the caller will
        trust when the answer is L{ROUTERS}, or C{None}.  Without
        C{SO_PEERPIDFD}, the process judged is one proven to hold the
        connection, which may be another process of the same user than
        the one that connected (handed the socket, it took the pid): then
        it counts as L{ROUTERS} only if it has the primary gid of
        C{client} and every one of C{groups} itself.
    """
    try:
        namespace = _peerNamespace(sock, client, groups)
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


def provable() -> bool:
    """
    Whether this kernel can prove which process a connection is from:
    with C{SO_PEERPIDFD} (Linux 6.5), or else with C{pidfd_open} and
    C{unix_diag} (see L{_fromHolder}).  Found out once, on a socket pair
    of the router's own; the router asks at start, so that the one
    warning, when it can't, comes then.
    """
    global _provable
    if _provable is None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            try:
                try:
                    os.close(_INT.unpack(ours.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, _INT.size))[0])
                except OSError:
                    os.close(os.pidfd_open(os.getpid()))
                    if peerInode(ours) != os.fstat(theirs.fileno()).st_ino:
                        raise OSError(errno.EINVAL, "unix_diag names another peer")
                _provable = True
            except OSError as e:
                _provable = False
                log.warn(
                    "this kernel has no SO_PEERPIDFD, and the router can't prove otherwise "
                    "which process holds a client's connection ({error}): processes in "
                    "rootless containers are routed as their own uid, and a rule by group "
                    "grants nothing (its deny applies); Linux 6.5 or later proves it",
                    error=e.strerror or e,
                )
    return _provable


def _walkUp(namespace: int) -> Optional[int]:
    """
    Owner of the ancestor of C{namespace} (a descriptor, closed by the
    caller) whose parent is the router's namespace; L{ROUTERS} for the
    router's namespace itself.
    """
    top = _ownNamespace()
    if _identity(namespace) == top:
        return ROUTERS
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
                owned: int = _UID.unpack(owner)[0]
                return owned
            if current != namespace:
                os.close(current)
            current = parent
    except OSError:
        return None
    finally:
        if current != namespace:
            os.close(current)


def _peerNamespace(sock: socket.socket, client: Credentials, groups: Optional[frozenset[int]]) -> int:
    """
    A descriptor of the peer's user namespace.  Where the kernel has them,
    from the pidfd the kernel recorded at connect (C{SO_PEERPIDFD}), which
    can't name another process; else from the process proven to hold the
    connection (L{_fromHolder}).
    """
    try:
        (pidfd,) = _INT.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, _INT.size))
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        return _fromHolder(sock, client, groups)
    try:
        try:
            return fcntl.ioctl(pidfd, PIDFD_GET_USER_NAMESPACE)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
        return _fromProc(client.pid, pidfd)
    finally:
        os.close(pidfd)


def _fromProc(pid: int, pidfd: int) -> int:
    """
    C{/proc/<pid>/ns/user}, kept only if the process C{pidfd} names is
    still alive after it was opened: a pid is reused only once its process
    is gone, so then C{/proc/<pid>} was that process.
    """
    namespace = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _checkAlive(pidfd)
    except OSError:
        os.close(namespace)
        raise
    return namespace


def _checkAlive(pidfd: int) -> None:
    """
    @raise OSError: once the process of C{pidfd} has exited (its pidfd
        polls readable; poll, not select: the router's descriptors run
        far past select's 1024).
    """
    exited = select.poll()
    exited.register(pidfd, select.POLLIN)
    if exited.poll(0):
        raise OSError(errno.ESRCH, "the process has exited")


def _fromHolder(sock: socket.socket, client: Credentials, groups: Optional[frozenset[int]]) -> int:
    """
    For kernels before 6.5, which don't say which process connected:
    C{/proc/<pid>/ns/user} of the pid C{SO_PEERCRED} names, only if that
    process is proven to hold the connection: the client's end of it (its
    inode, from C{unix_diag}) is among its descriptors.  A pid says
    nothing by itself: the process that connected may have handed the
    socket on and exited, and a process of someone's container taken its
    pid (and a start time can't tell, as a connection may wait before it
    is accepted).  The process is pinned with C{pidfd_open} before the
    reads and found alive after them, so all that was read was its.  It
    may still be another process than the one that connected, one it was
    handed to: so in the router's namespace it must have the groups the
    caller will trust itself (see L{namespaceOf}).
    """
    if not provable():
        raise OSError(errno.ENOSYS, "this kernel can't prove which process connected")
    pidfd = os.pidfd_open(client.pid)
    try:
        proc = os.open(f"/proc/{client.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not _holds(proc, peerInode(sock)):
                raise OSError(errno.ESRCH, "the process at the pid does not hold the connection")
            namespace = os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            try:
                if (
                    groups is not None
                    and _identity(namespace) == _ownNamespace()
                    and not _hasGroups(proc, client.gid, groups)
                ):
                    raise OSError(errno.ESRCH, "the process holding the connection lacks its groups")
                _checkAlive(pidfd)
            except OSError:
                os.close(namespace)
                raise
            return namespace
        finally:
            os.close(proc)
    finally:
        os.close(pidfd)


def peerInode(sock: socket.socket) -> int:
    """
    The inode of the socket at the other end of C{sock}, a connected Unix
    socket of the router's (for a client, the client's own end), from the
    kernel's C{unix_diag} (C{sock_diag(7)}).  The kernel answers within
    the send: nothing is waited for.

    @raise OSError: when the kernel won't say (no C{unix_diag}, no
        C{AF_NETLINK} in the sandbox, a socket of another network
        namespace).
    """
    inode = os.fstat(sock.fileno()).st_ino
    kind = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_NETLINK, kind, NETLINK_SOCK_DIAG) as diag:
        diag.send(
            _DIAG_REQUEST.pack(
                _DIAG_REQUEST.size, SOCK_DIAG_BY_FAMILY, 1,  # NLM_F_REQUEST: this one socket
                0, 0, socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF,
            )
        )
        reply = diag.recv(8192)
    length, answer, _, _, _ = _NLMSG_HEADER.unpack_from(reply)
    if answer == _NLMSG_ERROR:
        (number,) = _INT.unpack_from(reply, _NLMSG_HEADER.size)
        raise OSError(-number, os.strerror(-number))
    offset = _NLMSG_HEADER.size + _DIAG_MESSAGE_SIZE
    end = min(length, len(reply))
    while offset + _ATTRIBUTE.size <= end:
        size, attribute = _ATTRIBUTE.unpack_from(reply, offset)
        if size < _ATTRIBUTE.size:
            break
        if attribute == UNIX_DIAG_PEER:
            peer: int = _UID.unpack_from(reply, offset + _ATTRIBUTE.size)[0]
            return peer
        offset += (size + 3) & ~3
    raise OSError(errno.ENOTCONN, "the kernel names no peer")


def _holds(proc: int, inode: int) -> bool:
    """
    Whether the process whose C{/proc} directory is C{proc} has the socket
    C{inode} open, among its first L{_MOST_DESCRIPTORS} descriptors (a
    client can open millions; it is not made to wait on them).
    """
    wanted = f"socket:[{inode}]"
    fds = os.open("fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
    try:
        with os.scandir(fds) as entries:
            for count, entry in enumerate(entries):
                if count == _MOST_DESCRIPTORS:
                    return False
                try:
                    if os.readlink(entry.name, dir_fd=fds) == wanted:
                        return True
                except FileNotFoundError:
                    pass  # closed meanwhile
                # Anything else (EACCES without CAP_SYS_PTRACE: the listing is
                # allowed, each link is not) is the caller's to report.
    finally:
        os.close(fds)
    return False


def _hasGroups(proc: int, gid: int, groups: frozenset[int]) -> bool:
    """
    Whether the process whose C{/proc} directory is C{proc} runs with the
    effective gid C{gid} and has every one of C{groups} (as its primary or
    a supplementary group).
    """
    fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    with os.fdopen(fd, "rb") as f:
        fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
    effective = int(fields[b"Gid"].split()[1])
    held = {int(group) for group in fields[b"Groups"].split()} | {effective}
    return effective == gid and groups <= held
