"""
The tests that depend on the kernel, run on Debian 12's own (6.1, the
C{linux-image-amd64} of the archive) in QEMU.

That kernel has no C{SO_PEERPIDFD} (6.5), so the subordinate-uid code takes
its real fallback there (C{pidfd_open} and C{unix_diag}), which no shim
stands in for. QEMU runs with TCG: this machine kind has C{/dev/kvm}, but
nested KVM hangs. Python under TCG is about 20 times slower, so only the
modules that exercise the kernel run there (L{KERNEL_TESTS}).

The root file system (Debian 12 with its kernel, Python, the tools the tests
drive and a venv of the router's dependencies) is built once with
C{mmdebstrap} and cached under L{CACHE} as an ext4 image (keyed by
L{IMAGE_VERSION}: bump it when the build changes). Each run boots it with
writes kept in QEMU's snapshot, and a second disk holds a copy of the
checkout and the script the guest runs; the results come back on the serial
console, and the guest powers off.

Without C{DOCKERROUTER_KERNEL=1} the test skips; with it, a missing
C{qemu-system-x86_64}, C{mmdebstrap} or C{mkfs.ext4} (or not being root) is a
failure. As root::

    apt-get install -y mmdebstrap qemu-system-x86 e2fsprogs
    DOCKERROUTER_KERNEL=1 .venv/bin/python -m pytest -p no:cacheprovider tests/kernel
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from tests import debian

REQUIRED = os.environ.get("DOCKERROUTER_KERNEL") == "1"
CACHE = Path(os.environ.get("DR_KERNEL_CACHE", "/var/cache/docker-router-kernel"))
IMAGE_VERSION = "1"
SUITE = "bookworm"
KERNEL = "6.1."
# The kernel and a systemd to boot it; what the tests drive (unshare,
# newuidmap, useradd, setpriv, a C compiler for the LD_PRELOAD shim); a venv.
PACKAGES = [
    "linux-image-amd64", "systemd", "systemd-sysv", "udev", "iproute2", "procps",
    "python3", "python3-venv", "ca-certificates", "uidmap", "passwd", "util-linux",
    "gcc", "libc6-dev",
]
# Peer credentials and groups, the namespace owner with SO_PEERPIDFD's
# fallback, subordinate ids through real newuidmap/newgidmap, splice and
# pipe sizes, and the in-flight budget's socket buffers.
KERNEL_TESTS = [
    "tests.unit.test_credentials",
    "tests.unit.test_namespaces",
    "tests.unit.test_sockets",
    "tests.integration.test_namespaces",
    "tests.integration.test_subordinates",
    "tests.integration.test_relay",
]
VENV = "/opt/dr-venv"
CHECKOUT = "/srv/docker-router"
# Boot, the tests (about 20 times their time on the host) and power-off.
DEADLINE = 600
# The one unit the image boots into: it runs the script on the second disk,
# on the serial console, and powers off, whatever the result.
UNIT = f"""\
[Unit]
Description=docker-router's kernel tests
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p {CHECKOUT} && mount /dev/vdb {CHECKOUT} && exec /bin/sh {CHECKOUT}/.kernel-tests.sh'
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""
# The socket buffer limits of the host that runs the other layers, given to
# the guest: the kernel is what this layer varies, not the sysctls (with
# Debian's default net.core.wmem_max, 212,992, the budget's grown send
# buffer is capped at 416 KiB, and the tests that fill one assume more).
SOCKET_SYSCTLS = {
    name: Path("/proc/sys/net/core", name).read_text().strip()
    for name in ("wmem_max", "rmem_max", "wmem_default", "rmem_default")
}
# What the guest runs: which kernel it is, whether SO_PEERPIDFD (77) is
# there, then the tests; each result on a line of its own.
GUEST_SCRIPT = f"""\
echo "DR-KERNEL uname $(uname -r)"
{"; ".join(f"echo {value} > /proc/sys/net/core/{name}" for name, value in SOCKET_SYSCTLS.items())}
{VENV}/bin/python -c '
import errno, socket
a, b = socket.socketpair()
try:
    a.getsockopt(socket.SOL_SOCKET, 77, 4)
    print("DR-KERNEL peerpidfd ok")
except OSError as e:
    print("DR-KERNEL peerpidfd", errno.errorcode[e.errno])
'
cd {CHECKOUT} && PYTHONPATH={CHECKOUT} {VENV}/bin/python -m twisted.trial --temp-directory=/tmp/trial \\
    {" ".join(KERNEL_TESTS)} 2>&1
echo "DR-KERNEL exit $?"
"""


def _available():
    if not REQUIRED:
        pytest.skip("the kernel layer boots Debian 12's kernel in QEMU: set DOCKERROUTER_KERNEL=1 (as root)")
    problems = [t for t in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4") if shutil.which(t) is None]
    if os.geteuid() != 0:
        problems.append("root")
    if problems:
        pytest.fail(f"DOCKERROUTER_KERNEL=1 but missing: {', '.join(problems)} "
                    "(apt-get install mmdebstrap qemu-system-x86 e2fsprogs; run as root)", pytrace=False)


def _dependencies():
    """The router's own dependencies, from pyproject.toml: the guest's venv."""
    with open(debian.REPOSITORY / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def _buildImage(part):
    """
    Debian 12 with its kernel, and the venv, as an ext4 image beside the
    kernel and initrd it boots with.
    """
    part.mkdir()
    root = part / "root"
    requirements = part / "requirements.txt"
    requirements.write_text("\n".join(_dependencies()) + "\n")
    # The host's CA bundle, under one name in the root: it may hold the one
    # of a proxy on the way to the registry.
    bundles = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    env = [f"{k}={v}" for k, v in debian.passedEnvironment().items() if k not in bundles]
    pip = ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/root", *env, "PIP_CERT=/tmp/host-ca.crt",
           f"{VENV}/bin/pip", "install", "-q", "-r", "/tmp/requirements.txt"]
    debian.mmdebstrap(
        SUITE, root, PACKAGES, "--variant=minbase",
        "--customize-hook=upload /etc/ssl/certs/ca-certificates.crt /tmp/host-ca.crt",
        f"--customize-hook=upload {requirements} /tmp/requirements.txt",
        f'--customize-hook=chroot "$1" python3 -m venv {VENV}',
        '--customize-hook=chroot "$1" ' + shlex.join(pip),
        '--customize-hook=rm "$1/tmp/host-ca.crt" "$1/tmp/requirements.txt"',
    )
    (root / "etc/systemd/system/dr-kernel-tests.service").write_text(UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "dr-kernel-tests.service").symlink_to("../dr-kernel-tests.service")
    # The console is the tests' output, not a login prompt.
    (root / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")
    (root / "etc/hostname").write_text("drkernel\n")
    for name, pattern in (("vmlinuz", "vmlinuz-*"), ("initrd.img", "initrd.img-*")):
        (found,) = (root / "boot").glob(pattern)
        shutil.copy(found, part / name)
    image = part / "root.img"
    subprocess.run(["truncate", "-s", "3G", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(root), str(image)], check=True)
    shutil.rmtree(root)


def imageDirectory():
    """
    The cached image, kernel and initrd of this L{IMAGE_VERSION}, these
    packages and dependencies and this L{UNIT}.
    """
    key = hashlib.sha256(repr((PACKAGES, _dependencies(), UNIT)).encode()).hexdigest()[:12]
    return debian.cachedRoot(CACHE, f"debian-{SUITE}-v{IMAGE_VERSION}-{key}", _buildImage)


def checkoutDisk(directory):
    """
    An ext4 image of a copy of the checkout, with the guest's script.
    """
    tree = directory / "checkout"
    debian.copyCheckout(tree)
    tree.chmod(0o755)
    (tree / ".kernel-tests.sh").write_text(GUEST_SCRIPT)
    image = directory / "checkout.img"
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image)], check=True)
    return image


def boot(images, disk, console):
    """
    Boot the image with QEMU's TCG until the guest powers off; its serial
    console goes to C{console}.
    """
    with open(console, "wb") as output:
        subprocess.run(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-smp", "2", "-nographic", "-no-reboot",
             "-kernel", str(images / "vmlinuz"), "-initrd", str(images / "initrd.img"),
             "-append", "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=error",
             "-drive", f"file={images / 'root.img'},if=virtio,format=raw,snapshot=on",
             "-drive", f"file={disk},if=virtio,format=raw"],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, timeout=DEADLINE, check=True)


def test_kernelDependentTestsOnDebian12Kernel():
    """
    On Debian 12's own kernel, which really lacks C{SO_PEERPIDFD}, every
    kernel-dependent test runs (none skipped) and passes.
    """
    _available()
    images = imageDirectory()
    with tempfile.TemporaryDirectory(prefix="dockerrouter-kernel-") as name:
        directory = Path(name)
        console = directory / "console.log"
        try:
            boot(images, checkoutDisk(directory), console)
        finally:
            text = console.read_text(errors="replace") if console.exists() else ""
    said = dict(re.findall(r"DR-KERNEL (\w+) (.*?)\r?$", text, re.M))
    summary = re.findall(r"^(PASSED|FAILED) \((.*)\)\r?$", text, re.M)
    tail = text[-20000:]
    assert said.get("uname", "").startswith(KERNEL), f"not Debian 12's kernel: {said}\n{tail}"
    assert said.get("peerpidfd") == "ENOPROTOOPT", f"SO_PEERPIDFD on this kernel: {said}\n{tail}"
    assert said.get("exit") == "0" and summary and summary[-1][0] == "PASSED", tail
    assert "skips=" not in summary[-1][1], f"tests skipped on {said['uname']}:\n{tail}"
