"""
Setting up a user's rootless daemon on first use (C{--provision}).

When the on-demand starter (L{dockerrouter.service.starter}) finds that a
user has no daemon and nothing enabled to start, and the admin turned this
on, the router sets one up I{for} the user, I{as} the user: rootless Docker
(the user unit C{dockerd-rootless-setuptool.sh install} would write) or
rootless Podman's C{podman.socket}, enabled and started in the user's own
systemd manager.  The client waits meanwhile, its bytes held in the kernel.

What runs as root touches only C{/etc/subuid} and C{/etc/subgid} (through
C{usermod}, with C{provision-subids}, run by the system manager outside the
router's sandbox), the system manager (C{systemctl start user@UID.service})
and the router's own record (L{PROVISION_RECORDS}).
Everything that touches the user's home or runtime directory runs as the
user, through C{systemd-run --uid}: a user's home is theirs to booby-trap.

The checks first (L{plan}, in a thread: it reads the user database and
files), each failure a Docker API error that names what is missing and the
admin's command; then the steps, each a child process and one log line.
"""

import grp
import json
import os
import pwd
import shutil
import stat
import time
from typing import Any, Callable, Optional, Union

from attrs import field, frozen
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import deferLater

from dockerrouter.base.logging import RouterLogger
from dockerrouter.defaults import PROVISION_RECORDS
from dockerrouter.routing.reasons import BackendUnusable
from dockerrouter.routing.route import Backend
from dockerrouter.routing.subordinates import SubordinateRange, loginDefsUidMin, subordinateRanges
from dockerrouter.service.starter import Runner

# What the router can set up, in its default order of preference.
KINDS = ("docker", "podman")
# Every result a provisioning is counted by.
RESULTS = ("provisioned", "refused", "unmet", "failed", "timeout")
TIMEOUT = 120.0
# One subordinate range, as useradd(8) gives one.
SUBIDS = 65536
_POLL = 0.2
_UNIT_DIRECTORY = ".config/systemd/user"
# Exit status of the unit writer when the user already has a unit of that name.
_EXISTS = 3

# The unit dockerd-rootless-setuptool.sh writes (moby, contrib/), {bin} the
# directory of dockerd-rootless.sh.
DOCKER_UNIT = """\
# Written by docker-router for this account (as the user, on first use):
# what dockerd-rootless-setuptool.sh install would write.
[Unit]
Description=Docker Application Container Engine (Rootless)
Documentation=https://docs.docker.com/go/rootless/

[Service]
Environment=PATH={bin}:/sbin:/usr/sbin:/usr/local/bin:/usr/bin:/bin
ExecStart={bin}/dockerd-rootless.sh
ExecReload=/bin/kill -s HUP $MAINPID
TimeoutSec=0
RestartSec=2
Restart=always
StartLimitBurst=3
StartLimitInterval=60s
LimitNOFILE=infinity
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
Delegate=yes
Type=notify
NotifyAccess=all
KillMode=mixed

[Install]
WantedBy=default.target
"""

_INSTALL = "apt-get install"


class ProvisionRefused(BackendUnusable):
    """This account is not one the router sets a daemon up for."""

    cause = "provision-refused"
    status = 503
    aboutThePath = False
    template = (
        "No Docker daemon is running for user {user} (uid {uid}), and "
        "docker-router does not set one up for this account: {detail}"
    )
    advice = "ask the host's administrator"


class ProvisionUnmet(BackendUnusable):
    """Something the daemon needs is missing: the detail names it and the admin's fix."""

    cause = "provision-unmet"
    status = 503
    aboutThePath = False
    template = (
        "No Docker daemon is running for user {user} (uid {uid}), and "
        "docker-router cannot set one up yet: {detail}"
    )


class ProvisionFailed(BackendUnusable):
    cause = "provision-failed"
    status = 503
    aboutThePath = False
    template = "docker-router could not set up a Docker daemon for user {user} (uid {uid}): {detail}"
    advice = "the router's log says more (`journalctl -u docker-router`)"


class ProvisionTimedOut(ProvisionFailed):
    cause = "provision-timeout"
    status = 504
    template = (
        "docker-router was setting up a Docker daemon for user {user} (uid {uid}), "
        "and it did not answer within {detail}"
    )


@frozen
class Host:
    """Where this host keeps what provisioning looks at (tests point it elsewhere)."""

    subuid: str = "/etc/subuid"
    subgid: str = "/etc/subgid"
    loginDefs: str = "/etc/login.defs"
    path: str = "/usr/sbin:/usr/bin:/sbin:/bin"
    userUnits: str = "/usr/lib/systemd/user"
    dockerContrib: str = "/usr/share/docker.io/contrib"
    records: str = PROVISION_RECORDS
    # The user and group databases (they may ask LDAP: in a thread).
    account: Callable[[int], Any] = pwd.getpwuid
    group: Callable[[str], Any] = grp.getgrnam
    groupList: Callable[[str, int], list[int]] = os.getgrouplist

    def which(self, name: str) -> Optional[str]:
        return shutil.which(name, path=self.path)


@frozen
class Policy:
    """What the admin turned on."""

    kinds: tuple[str, ...] = KINDS
    group: Optional[str] = None
    addSubids: bool = False
    timeout: float = TIMEOUT


@frozen
class Plan:
    """What to do for one account, once every check passed."""

    user: str
    uid: int
    home: str
    kind: str
    # The directory of dockerd-rootless.sh (Docker only).
    bin: Optional[str] = None
    # Whether /etc/subuid, /etc/subgid need a range for the user.
    needSubuids: bool = False
    needSubgids: bool = False
    steps: list[str] = field(factory=list)


def _refused(why: str) -> tuple[type[BackendUnusable], str]:
    return ProvisionRefused, why


def plan(backend: Backend, policy: Policy, host: Host, uidMin: int) -> Union[Plan, tuple[type[BackendUnusable], str]]:
    """
    Whether, and what, to set up for C{backend}'s user: a L{Plan}, or the
    reason not to (a L{ProvisionRefused} or L{ProvisionUnmet} class and its
    detail).  It reads the user database and files: call it in a thread.
    """
    uid = backend.uid
    if uid == 0 or uid < uidMin:
        return _refused(f"uid {uid} is a system account (below UID_MIN {uidMin})")
    try:
        account = host.account(uid)
    except KeyError:
        return _refused(f"uid {uid} has no account")
    if policy.group is not None:
        try:
            gid = host.group(policy.group).gr_gid
        except KeyError:
            return _refused(f"the group {policy.group} that may have one set up does not exist")
        if gid not in host.groupList(account.pw_name, account.pw_gid):
            return _refused(f"only members of the group {policy.group} have one set up")
    why = homeProblem(account.pw_dir, uid)
    if why is not None:
        return _refused(why)
    kind = next((k for k in policy.kinds if _installed(k, host)), None)
    if kind is None:
        return ProvisionUnmet, (
            f"none of {', '.join(policy.kinds)} is installed; "
            f"ask the host's administrator to run `{_INSTALL} docker.io`"
        )
    missing = _missingPackages(kind, host)
    if missing:
        return ProvisionUnmet, (
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
            f"ask the host's administrator to run `{_INSTALL} {' '.join(missing)}`"
        )
    ranges = {path: [r for r in subordinateRanges(path, lambda _: None) if r.name in (account.pw_name, str(uid))]
              for path in (host.subuid, host.subgid)}
    needSubuids, needSubgids = not ranges[host.subuid], not ranges[host.subgid]
    if (needSubuids or needSubgids) and not policy.addSubids:
        free = freeRange(host, uidMin)
        where = " and ".join(p for p, found in ranges.items() if not found)
        fix = f"`usermod --add-subuids {free[0]}-{free[1]} --add-subgids {free[0]}-{free[1]} {account.pw_name}`" \
            if free else "`usermod --add-subuids A-B --add-subgids A-B " + account.pw_name + "`"
        return ProvisionUnmet, (
            f"the account has no subordinate id range in {where}; ask the host's administrator "
            f"to run {fix} (or to set provision-subids)"
        )
    return Plan(
        account.pw_name, uid, account.pw_dir, kind,
        bin=_rootlessScript(host) if kind == "docker" else None,
        needSubuids=needSubuids, needSubgids=needSubgids,
    )


def homeProblem(home: str, uid: int) -> Optional[str]:
    """
    What is wrong with C{home} as a place for C{uid}'s daemon, or C{None}.
    Looked at without following a link: a home that is a link, or lies
    under one the user could change, is refused.
    """
    if not os.path.isabs(home) or home == "/":
        return f"the account's home {home!r} is no directory of its own"
    path = "/"
    for part in [p for p in home.split("/") if p]:
        path = os.path.join(path, part)
        try:
            info = os.lstat(path)
        except OSError:
            return f"the account's home {home} does not exist"
        if stat.S_ISLNK(info.st_mode) and (path == os.path.normpath(home) or info.st_uid != 0):
            return f"the account's home {home} is a symbolic link ({path} -> {os.readlink(path)})"
    if not stat.S_ISDIR(info.st_mode):
        return f"the account's home {home} is not a directory"
    if info.st_uid != uid:
        return f"the account's home {home} belongs to uid {info.st_uid}, not to the user"
    return None


def _rootlessScript(host: Host) -> Optional[str]:
    found = host.which("dockerd-rootless.sh")
    if found is None and os.access(os.path.join(host.dockerContrib, "dockerd-rootless.sh"), os.X_OK):
        found = os.path.join(host.dockerContrib, "dockerd-rootless.sh")
    return os.path.dirname(found) if found else None


def _installed(kind: str, host: Host) -> bool:
    if kind == "docker":
        return host.which("dockerd") is not None and _rootlessScript(host) is not None
    return host.which("podman") is not None and os.path.exists(os.path.join(host.userUnits, "podman.socket"))


def _missingPackages(kind: str, host: Host) -> list[str]:
    """The packages (Debian's names) a rootless C{kind} needs and this host lacks."""
    need = {
        "uidmap": host.which("newuidmap") is not None and host.which("newgidmap") is not None,
        "dbus-user-session": os.path.exists(os.path.join(host.userUnits, "dbus.socket")),
    }
    if kind == "docker":
        need["rootlesskit"] = host.which("rootlesskit") is not None
        need["slirp4netns"] = host.which("slirp4netns") is not None
    return sorted(name for name, there in need.items() if not there)


def freeRange(host: Host, uidMin: int, size: int = SUBIDS) -> Optional[tuple[int, int]]:
    """
    The lowest C{size} ids (first, last) that no range of either file
    holds, at or above C{SUB_UID_MIN} of C{login.defs} (and never below
    C{UID_MIN}), up to C{SUB_UID_MAX}; C{None} when there is no room.
    """
    first = max(_loginDefs(host.loginDefs, "SUB_UID_MIN", 100000), uidMin)
    last = _loginDefs(host.loginDefs, "SUB_UID_MAX", 600100000)
    taken: list[SubordinateRange] = sorted(
        [r for path in (host.subuid, host.subgid) for r in subordinateRanges(path, lambda _: None)],
        key=lambda r: r.start,
    )
    for r in taken:
        if r.start >= first + size:
            break
        first = max(first, r.start + r.size)
    return (first, first + size - 1) if first + size - 1 <= last else None


def _loginDefs(path: str, key: str, default: int) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == key and fields[1].isdigit():
                    return int(fields[1])
    except OSError:
        pass
    return default


def readRecords(directory: str) -> dict[int, dict[str, Any]]:
    """The router's records of whom it set up, by uid (none when unreadable)."""
    records: dict[int, dict[str, Any]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return records
    for name in names:
        if name.endswith(".json") and name[:-5].isdigit():
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    records[int(name[:-5])] = json.load(f)
            except (OSError, ValueError):
                continue
    return records


def writeRecord(directory: str, record: dict[str, Any]) -> None:
    """
    Keep C{record} as C{UID.json} in the router's own (root's) directory;
    readable, so that the user's own C{docker-router doctor} can say it.
    """
    os.makedirs(directory, exist_ok=True)
    # Modes set, not asked of the umask (the unit's is 0077).
    os.chmod(directory, 0o755)
    path = os.path.join(directory, f"{record['uid']}.json")
    with open(os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "w") as f:
        os.fchmod(f.fileno(), 0o644)
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(path + ".new", path)


class Provisioner:
    """
    Sets up users' daemons.  The starter holds one attempt per user, and so
    one provisioning per user; this holds one C{usermod} at a time, so that
    two users never get the same free range.

    @ivar counts: provisionings by result (see L{RESULTS}), for metrics.
    @ivar records: whom the router set up, by uid (for status).
    """

    log = RouterLogger()
    systemctl = "/usr/bin/systemctl"
    systemdRun = "/usr/bin/systemd-run"
    usermod = "/usr/sbin/usermod"

    def __init__(
        self,
        reactor: Any,
        run: Runner,
        policy: Policy,
        host: Host = Host(),
        uidMin: Optional[int] = None,
        inThread: Optional[Callable[..., Deferred]] = None,
    ) -> None:
        self.reactor = reactor
        self.run = run
        self.policy = policy
        self.host = host
        self.uidMin = loginDefsUidMin(host.loginDefs) if uidMin is None else uidMin
        self.inThread = inThread or threads.deferToThread
        self.counts = dict.fromkeys(RESULTS, 0)
        self.records: dict[int, dict[str, Any]] = {}
        self._subids = DeferredLock()

    def loadRecords(self) -> Deferred:
        """Read the records of earlier runs (at start, in a thread)."""
        return self.inThread(readRecords, self.host.records).addCallback(self.records.update)

    def refusal(self, backend: Backend, why: str) -> ProvisionRefused:
        """The answer for a user the starter itself won't start (counted)."""
        self.counts["refused"] += 1
        self.log.info("provision: not for user {user} (uid {uid}): {why}", user=backend.user, uid=backend.uid, why=why)
        return ProvisionRefused(backend, why)

    def provision(self, backend: Backend, ready: Callable[[], "Deferred[bool]"]) -> "Deferred[Optional[BackendUnusable]]":
        """
        Set up C{backend}'s user's daemon and wait until C{ready} says it
        answers, within the policy's timeout.

        @return: fires with C{None} when it answers, else the reason to
            answer the client with.  Cancelling it stops the step under way.
        """
        began = self.reactor.seconds()
        state: dict[str, str] = {"step": "checks"}
        d = defer.ensureDeferred(self._provision(backend, ready, state))
        d.addTimeout(self.policy.timeout, self.reactor)

        def failed(failure: Any) -> BackendUnusable:
            if failure.check(defer.TimeoutError):
                return ProvisionTimedOut(backend, f"{self.policy.timeout:g} seconds (at: {state['step']})")
            if failure.check(_StepFailed):
                return failure.value.reason
            if failure.check(defer.CancelledError):
                return ProvisionFailed(backend, f"cancelled at: {state['step']}")
            self.log.failure("provision: user {user} (uid {uid})", failure, user=backend.user, uid=backend.uid)
            return ProvisionFailed(backend, f"{state['step']}: {failure.getErrorMessage()}")

        def counted(reason: Optional[BackendUnusable]) -> Optional[BackendUnusable]:
            results: dict[Optional[type], str] = {
                None: "provisioned", ProvisionRefused: "refused", ProvisionUnmet: "unmet",
                ProvisionTimedOut: "timeout",
            }
            result = results.get(None if reason is None else type(reason), "failed")
            self.counts[result] += 1
            seconds = self.reactor.seconds() - began
            if reason is None:
                self.log.info("provision: user {user} (uid {uid}): done, the daemon answers after {seconds:.1f}s",
                              user=backend.user, uid=backend.uid, seconds=seconds)
            else:
                self.log.warn("provision: user {user} (uid {uid}): {result}: {reason}",
                              user=backend.user, uid=backend.uid, result=result, reason=reason.message)
            return reason

        return d.addErrback(failed).addCallback(counted)

    async def _provision(
        self, backend: Backend, ready: Callable[[], "Deferred[bool]"], state: dict[str, str]
    ) -> Optional[BackendUnusable]:
        planned = await self.inThread(plan, backend, self.policy, self.host, self.uidMin)
        if not isinstance(planned, Plan):
            kind, why = planned
            return kind(backend, why)
        self.log.info("provision: user {user} (uid {uid}): setting up rootless {kind}",
                      user=planned.user, uid=planned.uid, kind=planned.kind)
        if planned.needSubuids or planned.needSubgids:
            state["step"] = "subordinate ids"
            await self._subids.run(lambda: defer.ensureDeferred(self._addSubids(backend, planned)))
        for step, argv in self._steps(planned):
            state["step"] = step
            await self._do(backend, planned, step, argv)
        state["step"] = "waiting for the daemon to answer"
        while not await ready():
            await deferLater(self.reactor, _POLL, lambda: None)
        record = dict(
            user=planned.user, uid=planned.uid, kind=planned.kind, at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            steps=planned.steps,
        )
        state["step"] = "keeping the record"
        await self.inThread(writeRecord, self.host.records, record)
        self.records[planned.uid] = record
        return None

    async def _addSubids(self, backend: Backend, planned: Plan) -> None:
        """Add a free range (under the lock: two users never get the same one)."""
        free = await self.inThread(freeRange, self.host, self.uidMin)
        if free is None:
            raise _StepFailed(ProvisionUnmet(backend, "no free subordinate id range is left below SUB_UID_MAX "
                                             "(login.defs); ask the host's administrator to add one"))
        ids = f"{free[0]}-{free[1]}"
        # Run by the system manager: the router's own sandbox keeps /etc read-only.
        argv = [self.systemdRun, "--no-ask-password", "--pipe", "--wait", "--quiet", "--collect", self.usermod]
        argv += ["--add-subuids", ids] if planned.needSubuids else []
        argv += ["--add-subgids", ids] if planned.needSubgids else []
        await self._do(backend, planned, f"add subordinate ids {ids}", argv + [planned.user])

    def _steps(self, planned: Plan) -> list[tuple[str, list[str]]]:
        steps = [("start the user's manager", [self.systemctl, "start", f"user@{planned.uid}.service"])]
        if planned.kind == "podman":
            return steps + [("enable podman.socket", self._asUser(planned, self.systemctl, "--user", "enable", "--now",
                                                                  "podman.socket"))]
        unit = DOCKER_UNIT.format(bin=planned.bin)
        # As the user: a unit of theirs of that name is left alone (set -C: never overwritten).
        write = (
            f'set -eC; umask 022; d="$HOME/{_UNIT_DIRECTORY}"; mkdir -p "$d"; '
            f'[ ! -e "$d/docker.service" ] || exit {_EXISTS}; printf %s "$1" > "$d/docker.service"'
        )
        return steps + [
            ("write docker.service", self._asUser(planned, "/bin/sh", "-c", write, "sh", unit)),
            ("reload the user's manager", self._asUser(planned, self.systemctl, "--user", "daemon-reload")),
            ("enable docker.service", self._asUser(planned, self.systemctl, "--user", "enable", "--now",
                                                   "docker.service")),
        ]

    def _asUser(self, planned: Plan, *argv: str) -> list[str]:
        """A command run as the user (the verified number) by the system manager, in their environment."""
        return [
            self.systemdRun, f"--uid={planned.uid}", "--no-ask-password", "--pipe", "--wait", "--quiet", "--collect",
            f"--setenv=XDG_RUNTIME_DIR=/run/user/{planned.uid}", *argv,
        ]

    async def _do(self, backend: Backend, planned: Plan, step: str, argv: list[str]) -> None:
        self.log.info("provision: user {user} (uid {uid}): {step}", user=planned.user, uid=planned.uid, step=step)
        out, err, code = await self.run(argv)
        planned.steps.append(step)
        if code == _EXISTS and step == "write docker.service":
            raise _StepFailed(ProvisionRefused(
                backend, f"the user has a docker.service of their own in ~/{_UNIT_DIRECTORY}, "
                "not enabled: docker-router leaves it alone"))
        if code != 0:
            lines = (err or out).decode("utf-8", "replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {code}"
            raise _StepFailed(ProvisionFailed(backend, f"{step} failed: {why}"))


class _StepFailed(Exception):
    """A step ended the provisioning with this reason."""

    def __init__(self, reason: BackendUnusable) -> None:
        super().__init__(reason.message)
        self.reason = reason

