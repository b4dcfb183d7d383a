"""
A Debian machine (12 or 13) with a real systemd, for the system tests.

The root file system of each release is built once with C{mmdebstrap} (from
Debian's default mirror and the release's updates and security suites) and
kept under L{CACHE} (keyed by L{IMAGE_VERSION}: bump it when L{PACKAGES} or
the build changes). Each L{Machine} boots it with C{systemd-nspawn -b} on a
fresh overlay, so every boot starts from the same state and nothing a test
does reaches the cache. Tests drive the machine from outside with C{nsenter}
into its init's namespaces (C{systemd-run -M} needs a registered machine, and
C{--register=no} is what works on this machine kind).

What is baked into the image is what a Debian host would fetch from its
mirror: the packages the tests drive the machine with are installed; the
ones README.md's steps add (C{man-db}, and C{docker.io} and friends, which a
test installs before or after the router) are only downloaded into apt's
cache, so the image is the fresh host README.md starts from. The router
itself is installed in every test exactly as README.md says.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests import debian

CACHE = Path(os.environ.get("DR_SYSTEM_CACHE", "/var/cache/docker-router-system"))
IMAGE_VERSION = "2"
# Debian 12 and 13: the releases README.md's steps are tested on.
RELEASES = ["bookworm", "trixie"]
# Installed in the image: a booting systemd with logind (user managers), and
# what the tests drive the machine with.
PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "dbus-user-session",
    "python3-venv", "sudo", "iproute2", "procps", "curl", "ca-certificates", "busybox-static",
]
# Only downloaded: what README.md's steps install (the router's and the
# per-host Docker packages, installed by a test before or after the router).
DOWNLOADED = ["man-db", "docker.io", "rootlesskit", "uidmap", "slirp4netns", "dbus-user-session"]
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How the host reaches its package registries: the container shares the
# host's network, and gets its CA bundle and pip configuration.
HOST_FILES = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf", "/etc/xdg/pip"]
BOOT_DEADLINE = 60


def missingTools():
    """
    The host tools this layer needs that are not installed.
    """
    return [t for t in ("mmdebstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]


def imageRoot(release):
    """
    The cached root file system of C{release} at this L{IMAGE_VERSION},
    built if missing.
    """
    def build(part):
        debian.mmdebstrap(
            release, part, PACKAGES, "--variant=apt", "--skip=cleanup/apt/lists", "--skip=cleanup/apt/cache",
            "--customize-hook=chroot \"$1\" apt-get install -y -q --download-only " + " ".join(DOWNLOADED))

    return debian.cachedRoot(CACHE, f"debian-{release}-v{IMAGE_VERSION}", build)


class CommandFailed(AssertionError):
    pass


class Machine:
    """
    One boot of the image: an overlay over the cached root, C{/home} on the
    host's file system (a rootless dockerd's overlay2 can't sit on an
    overlay), and C{systemd-nspawn -b} in its own session.
    """

    def __init__(self, release):
        self.release = release
        self.dir = Path(tempfile.mkdtemp(prefix="dockerrouter-system-"))
        self.root = self.dir / "root"
        self.nspawn = None
        self.leader = None

    def boot(self):
        lower = imageRoot(self.release)
        for d in ("upper", "work", "root", "home"):
            (self.dir / d).mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={self.dir}/upper,workdir={self.dir}/work", str(self.root)],
            check=True)
        self._prepare()
        binds = [f"--bind-ro={p}:{p}" for p in HOST_FILES if os.path.exists(p)]
        env = dict(os.environ,
                   # The VM's cgroups are hybrid: give the container a cgroup v2, as on a real Debian host.
                   SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1",
                   # /proc/sys/net writable: a rootless dockerd sets ip_forward in its own network namespace.
                   SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        self.console = open(self.dir / "console.log", "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--quiet", "--directory", str(self.root),
             "--register=no", "--keep-unit", "--machine=drsystem",
             # Without it every container of a rootless daemon fails: "unable to join session keyring".
             "--system-call-filter=@keyring",
             f"--bind={self.dir}/home:/home", *binds],
            env=env, stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + BOOT_DEADLINE
        while self.leader is None:
            self._checkAlive()
            # Not the first child: nspawn's outer child sets up and exits; the leader is its
            # init, once it has exec'd systemd.
            children = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(self.nspawn.pid)],
                                      capture_output=True, text=True).stdout.split("\n")
            leaders = [int(line.split()[0]) for line in children if line.split()[1:] == ["systemd"]]
            if leaders:
                self.leader = leaders[0]
            elif time.monotonic() > deadline:
                raise CommandFailed("systemd-nspawn started no container")
            else:
                time.sleep(0.05)
        while True:
            self._checkAlive()
            state = self.run("systemctl is-system-running --wait", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise CommandFailed(f"the machine did not boot: {state}\n{self.consoleText()}")
        # What the kernel of this machine kind lacks, as a real host would have it: users may open
        # /dev/net/tun (slirp4netns), and ip_tables is built in (the setup tool looks for it).
        self.run("chmod 0666 /dev/net/tun && mkdir -p /lib/modules/$(uname -r) && "
                 "echo kernel/net/ipv4/netfilter/ip_tables.ko >/lib/modules/$(uname -r)/modules.builtin")
        return self

    def _prepare(self):
        """
        A clone of the repository at /root/docker-router (tracked and new
        files, as they are in the worktree): pip builds in place, so it can't
        be a read-only bind.
        """
        debian.copyCheckout(self.root / "root" / "docker-router")

    def _checkAlive(self):
        if self.nspawn.poll() is not None:
            raise CommandFailed(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.consoleText()}")

    def consoleText(self):
        return (self.dir / "console.log").read_text(errors="replace")[-4000:]

    def _command(self, script, user=None):
        env = [f"PATH={SAFE_PATH}", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]
        env += [f"{k}={v}" for k, v in debian.passedEnvironment().items()]
        argv = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
                "env", "-i", *env]
        if user is None:
            return argv + ["HOME=/root", "/bin/sh", "-c", script]
        # A plain process of the user (no login session): what a cron job or a
        # lingering user's tool is.
        return argv + ["runuser", "-u", user, "--", "/bin/sh", "-c", f"cd && {script}"]

    def run(self, script, user=None, check=True, timeout=300, input=None):
        """
        Run a shell script in the machine, as root or as C{user}; a failure
        (with C{check}) raises with everything it printed.
        """
        result = subprocess.run(self._command(script, user), capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise CommandFailed(
                f"{script!r} as {user or 'root'} exited {result.returncode}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
        return result

    def spawn(self, script, user=None):
        """
        Start a script in the machine; its output is the returned
        L{subprocess.Popen}'s C{stdout}, its pid in the machine C{.inner}
        (L{kill} ends it: killing the local C{nsenter} would not).
        """
        process = subprocess.Popen(self._command(f"echo $$; {script}", user), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        process.inner = int(process.stdout.readline())
        return process

    def kill(self, process):
        """
        End a process started with L{spawn}.
        """
        self.run(f"kill {process.inner}", check=False)
        process.wait(timeout=30)

    def login(self, user, script, timeout=300):
        """
        Run a script in a login session of C{user}, as a user would after
        logging in: C{pam_systemd} gives it a session, C{XDG_RUNTIME_DIR} and
        a running user manager.
        """
        quoted = script.replace("'", "'\"'\"'")
        return self.run(
            f"systemd-run --quiet --wait --pipe --collect -p PAMName=login -p User={user} "
            f"/bin/bash -lc 'cd && {quoted}'", timeout=timeout, check=False)

    def shutdown(self):
        """
        Kill the machine outright (its init, and with it the whole PID
        namespace) and remove every trace on the host.
        """
        if self.leader is not None:
            try:
                os.kill(self.leader, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.nspawn is not None:
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait()
            self.console.close()
        subprocess.run(["umount", "-l", str(self.root)], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)
