"""
A FUSE file system (mounted C{allow_other}) whose root answers and whose
every other lookup never does: a hung NFS server, or a user's FUSE mount
made to hold whoever looks into it.  Run with Debian's python3 and
python3-fusepy: C{hungfuse.py MOUNTPOINT}; it prints C{ready} once the
root answers, and lookups are held until the process is killed.
"""

import errno
import os
import stat
import sys
import threading
import time

import fusepy  # type: ignore[import-not-found]  # Debian's python3-fusepy, outside the venv


class Hung(fusepy.Operations):
    def __init__(self) -> None:
        self.never = threading.Event()

    def getattr(self, path, fh=None):
        if path == "/":
            now = time.time()
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_atime=now, st_mtime=now, st_ctime=now)
        self.never.wait()
        raise fusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", ".."]


def main() -> None:
    mountpoint = sys.argv[1]

    def announce() -> None:
        while not os.path.ismount(mountpoint):
            time.sleep(0.05)
        print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    fusepy.FUSE(Hung(), mountpoint, foreground=True, allow_other=True, nothreads=False)


if __name__ == "__main__":
    main()
