"""
The Unix socket file an endpoint names: the path in a C{unix:} endpoint
description, and the file bound there.  The daemon reads its listeners'
paths here, and C{docker-router status} the control socket's.
"""

import os
from typing import Optional


def unixPath(description: str) -> Optional[str]:
    """
    The path a C{unix:} endpoint description names (its options left out),
    or C{None} for another kind of endpoint.
    """
    if description.startswith("unix:"):
        return description[len("unix:") :].split(":", 1)[0]
    return None


def bindInode(path: str) -> tuple[int, int]:
    """The (device, inode) of the socket file at C{path}, just bound."""
    st = os.stat(path)
    return st.st_dev, st.st_ino
