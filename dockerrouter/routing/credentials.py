"""
Who is at the other end of a Unix socket, as the kernel saw them.

The router trusts nothing a client says about itself: both the client's
identity and the backend daemon's identity come from C{SO_PEERCRED}.
"""

import socket
import struct
from typing import NamedTuple, Optional

# struct ucred: pid_t (signed), uid_t and gid_t (unsigned: uids of 2**31 and
# above exist, and must not come out negative).
_UCRED = struct.Struct("iII")
_GID = struct.Struct("I")
# Not in Python 3.11's socket module.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# Python's getsockopt takes at most 1024 bytes: 256 groups.  A client in
# more gets none (it is judged by less than it has, never by more).
_MAX_GROUPS = 256


class Credentials(NamedTuple):
    """
    The process credentials the kernel recorded for a socket's peer: for a
    connecting client, when it called C{connect}; for a listening daemon,
    when it called C{listen}.  (A tuple: two are made for every connection.)
    """

    pid: int
    uid: int
    gid: int


def peerCredentials(sock: socket.socket) -> Credentials:
    """
    Read C{SO_PEERCRED} from a connected Unix stream socket.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Credentials(*_UCRED.unpack(raw))


def peerGroups(sock: socket.socket) -> Optional[frozenset[int]]:
    """
    The supplementary groups the kernel recorded for a socket's peer
    (C{SO_PEERGROUPS}), or C{None} when they can't be read (more than 256
    of them, for one).
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_GROUPS * _GID.size)
    except OSError:
        return None
    return frozenset(gid for (gid,) in _GID.iter_unpack(raw))
