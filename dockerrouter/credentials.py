"""
Who is at the other end of a Unix socket, as the kernel saw them.

The router trusts nothing a client says about itself: both the client's
identity and the backend daemon's identity come from C{SO_PEERCRED}.
"""

import socket
import struct

from attrs import frozen

_UCRED = struct.Struct("3i")


@frozen
class Credentials:
    """
    The process credentials the kernel recorded for a socket's peer: for a
    connecting client, when it called C{connect}; for a listening daemon,
    when it called C{listen}.
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
