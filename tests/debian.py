"""
What the layers that boot Debian share (tests/system under systemd-nspawn,
tests/kernel under QEMU): a root file system built once with C{mmdebstrap}
and cached, the environment that reaches the package registries, and a copy
of the checkout.

No mirror is named: C{mmdebstrap} given a release name uses Debian's own
default mirror and adds that release's updates and security suites, as a
fresh install of that release would have them.
"""

import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

REPOSITORY = Path(__file__).resolve().parents[1]
# How the host reaches its package registries (proxies, CA bundles, pip's
# index); PIP_FIND_LINKS names a host directory, which a guest lacks.
PASSED_ENV = re.compile(
    r"^(PIP_(?!FIND_LINKS)\w+|SSL_CERT_FILE|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|(https?|no)_proxy|(HTTPS?|NO)_PROXY)$")


def passedEnvironment() -> dict[str, str]:
    """
    The variables of this process that say how to reach the registries.
    """
    return {k: v for k, v in os.environ.items() if PASSED_ENV.match(k)}


def cachedRoot(cache: Path, name: str, build: Callable[[Path], None]) -> Path:
    """
    The directory C{cache/name}, made by C{build} if missing.

    A lock keeps two test runs from building it at once; C{build} fills a
    temporary name, renamed in place when complete (so a build that failed
    half-way is never used).
    """
    root = cache / name
    if root.exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if root.exists():
            return root
        part = Path(str(root) + ".part")
        shutil.rmtree(part, ignore_errors=True)
        build(part)
        part.rename(root)
    return root


def mmdebstrap(suite: str, target: Path, packages: list[str], *options: str) -> None:
    """
    Debian C{suite} with C{packages} into C{target}, from Debian's default
    mirror and the release's updates and security suites.
    """
    done = subprocess.run(
        ["mmdebstrap", "--include=" + ",".join(packages), *options, suite, str(target)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    if done.returncode != 0:
        raise AssertionError(f"mmdebstrap {suite} exited {done.returncode}:\n{done.stderr[-4000:]}")


def copyCheckout(target: Path) -> None:
    """
    The checkout's tracked and new files (as they are in the worktree, not
    as last committed) copied to C{target}.
    """
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPOSITORY, check=True, capture_output=True).stdout.split(b"\0")
    target.mkdir(parents=True, exist_ok=True)
    for name in filter(None, files):
        source = REPOSITORY / os.fsdecode(name)
        if source.is_file():
            (target / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / os.fsdecode(name))
