"""
Zero steps for a new user (issue 20) under a real systemd: with
C{provision} on, a brand-new account (C{useradd -m}, never logged in, no
linger) gets an answer from its own rootless daemon to its FIRST C{docker
version}, set up by the router as the user; two accounts at once get one
each; the accounts it must not touch are refused with their reason, and
nothing is written for them.
"""

import time

import pytest
from conftest import IMAGE, installedMachine

PAM, QUINN = "dr-pam", "dr-quinn"
OUTSIDER, SYSTEM, LINKED = "dr-rita", "dr-sys", "dr-linky"
GROUP = "docker-users"
RECORDS = "/var/lib/docker-router/provisioned"


@pytest.fixture(scope="module")
def m(release):
    with installedMachine(release) as machine:
        machine.run(
            f"groupadd {GROUP} && "
            f"useradd --create-home --groups {GROUP} {PAM} && "
            f"useradd --create-home --groups {GROUP} {QUINN} && "
            # No subordinate ids: provision-subids gives a free range.
            f"sed -i '/^{QUINN}:/d' /etc/subuid /etc/subgid && "
            f"useradd --create-home {OUTSIDER} && "
            f"useradd --system --create-home --groups {GROUP} {SYSTEM} && "
            f"useradd --no-create-home --home-dir /home/{LINKED} --groups {GROUP} {LINKED} && "
            f"ln -s /root /home/{LINKED} && "
            "mkdir -p /etc/docker-router && printf '%s\\n' "
            "'provision = [\"docker\", \"podman\"]' "
            f"'provision-group = \"{GROUP}\"' "
            "'provision-subids = true' >/etc/docker-router/docker-router.toml && "
            "systemctl restart docker-router"
        )
        machine.uids = {name: int(machine.run(f"id -u {name}").stdout)
                        for name in (PAM, QUINN, OUTSIDER, SYSTEM, LINKED)}
        machine.before = {name: traces(machine, name) for name in (OUTSIDER, SYSTEM, LINKED)}
        yield machine


def traces(m, name):
    """What the router could have written for C{name}: their subordinate ids, their home's files."""
    return m.run(f"grep '^{name}:' /etc/subuid /etc/subgid; find /home/{name}/ -printf '%p %u\\n' | sort",
                 check=False).stdout


def routerLines(m, prefix):
    return [line for line in m.run("journalctl -u docker-router --no-pager -o cat").stdout.splitlines()
            if line.startswith(prefix)]


def test_firstTryForTwoNewAccountsAtOnce(m):
    began = time.monotonic()
    pam = m.spawn("docker version --format '{{.Server.Version}} {{.Server.Os}}'", user=PAM)
    quinn = m.spawn("docker version --format '{{.Server.Version}} {{.Server.Os}}'", user=QUINN)
    results = {}
    for name, process in ((PAM, pam), (QUINN, quinn)):
        out, _ = process.communicate(timeout=200)
        results[name] = (process.returncode, out, time.monotonic() - began)
    print(f"first `docker version` answered after: {PAM} {results[PAM][2]:.1f}s, {QUINN} {results[QUINN][2]:.1f}s")
    for name, (code, out, _) in results.items():
        assert code == 0 and out.strip().endswith("linux"), (name, out, routerLines(m, "provision: "))
    for name in (PAM, QUINN):
        uid = m.uids[name]
        # Its own daemon, running as the user.
        owners = m.run(f"ps -o user= -p $(pgrep -d, -u {uid} -x dockerd)").stdout.split()
        assert owners and set(owners) == {name}, owners
        assert m.run(f"find /home/{name}/ ! -user {name}").stdout == ""
        assert m.run(f"test -L /home/{name}/.config/systemd/user/default.target.wants/docker.service",
                     check=False).returncode == 0
        assert f'"uid": {uid}' in m.run(f"cat {RECORDS}/{uid}.json").stdout
    # The range the router added for QUINN overlaps no one's.
    ranges = sorted(tuple(map(int, line.split(":")[1:])) for line in m.run("cat /etc/subuid").stdout.split())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), ranges
    assert any(line.startswith(f"{QUINN}:") for line in m.run("cat /etc/subuid /etc/subgid").stdout.split())
    status = m.run("docker-router status").stdout
    assert f"set up by docker-router: {PAM} (uid {m.uids[PAM]}), rootless docker" in status, status
    doctor = m.run(f"docker-router doctor {PAM}", check=False).stdout
    assert "set up by docker-router: rootless docker at" in doctor, doctor


def test_runsAContainer(m):
    tar = m.run("cd /root/docker-router && DR_E2E_STATE=/var/tmp/dr bash .ci/rootless-docker.sh rootfs "
                "&& chmod 0644 /var/tmp/dr/*.tar").stdout.strip()
    m.run(f"docker import - {IMAGE} <{tar}", user=PAM, timeout=120)
    assert m.run(f"docker run --rm {IMAGE} echo set up for me", user=PAM, timeout=120).stdout == "set up for me\n"


@pytest.mark.parametrize("name, reason", [
    (OUTSIDER, f"only members of the group {GROUP} have one set up"),
    (SYSTEM, "is below UID_MIN"),
    (LINKED, f"the account's home /home/{LINKED} is a symbolic link"),
])
def test_refusedWithTheirReasonAndNothingWritten(m, name, reason):
    # As the user, from / (dr-linky can't enter their home: it is /root).
    ps = m.run(f"cd / && runuser -u {name} -- docker version", check=False, timeout=120)
    assert ps.returncode != 0
    assert "docker-router does not set one up for this account" in ps.stderr, ps.stderr
    assert reason in ps.stderr, ps.stderr
    uid = m.uids[name]
    assert m.run(f"test -e {RECORDS}/{uid}.json", check=False).returncode != 0
    assert traces(m, name) == m.before[name]
    assert m.run("test -e /root/.config/systemd/user/docker.service", check=False).returncode != 0
