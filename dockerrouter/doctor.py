"""
C{docker-router doctor [USER]}: what stands between a user and their Docker
daemon, one line per check, with the command that fixes each failure.

A user runs it for themselves; root for anyone.  Root looks at files with
root's eyes, but asks each daemon for C{_ping} with the user's own rights (a
child process with their uid), as the user's docker CLI would.  Nothing of
the router's reactor side is imported.
"""

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
from typing import Optional, TextIO

from attrs import frozen

from dockerrouter.defaults import DEFAULT_CONFIG, DEFAULT_SUBUID_FILE, PROVISION_RECORDS, SETUP_TOOL
from dockerrouter.routing.advice import findSetupTool, locateSetupTool
from dockerrouter.routing.reasons import BackendUnusable
from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.configured import resolverFrom, subordinatesFrom
from dockerrouter.routing.credentials import peerCredentials
from dockerrouter.routing.rules import Lookups, RuleError, checkTemplate, parseRules
from dockerrouter.routing.subordinates import subordinateRanges

# What the docker CLI uses when nothing says otherwise: the router.
ROUTER_HOSTS = ("unix:///var/run/docker.sock", "unix:///run/docker.sock")
LINGER = "/var/lib/systemd/linger"
PING_TIMEOUT = 5.0

OK, WARN, FAIL, NOTE = "ok", "warn", "FAIL", "--"


@frozen
class Check:
    """One line of the report; a failure says what fixes it."""

    status: str
    what: str
    detail: str
    fix: Optional[str] = None

    def line(self) -> str:
        text = f"{self.status:<4}  {self.what}: {self.detail}"
        return text + (f"; fix: {self.fix}" if self.fix else "")


def checkSubordinates(user: pwd.struct_passwd, etc: str = "/etc") -> list[Check]:
    checks = []
    for kind, flag in (("uid", "subuids"), ("gid", "subgids")):
        path = os.path.join(etc, f"sub{kind}")
        # Broken lines are the router's to warn of; here they are no range.
        ranges = list(subordinateRanges(path, lambda warning: None))
        mine = [f"{r.start}-{r.start + r.size - 1}" for r in ranges if r.name in (user.pw_name, str(user.pw_uid))]
        end = max([100000] + [r.start + r.size for r in ranges])
        if mine:
            checks.append(Check(OK, f"subordinate {kind}s", f"{', '.join(mine)} in {path}"))
        else:
            free = f"{end}-{end + 65535}"
            checks.append(Check(FAIL, f"subordinate {kind}s", f"{user.pw_name} has no range in {path}",
                                f"as root: usermod --add-{flag} {free} {user.pw_name}"))
    return checks


def checkIdMappers() -> list[Check]:
    checks = []
    for name in ("newuidmap", "newgidmap"):
        path = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if path is None:
            checks.append(Check(FAIL, name, "not installed", "as root: apt-get install uidmap"))
            continue
        setuid = os.stat(path).st_mode & stat.S_ISUID
        try:
            capabilities = bool(os.getxattr(path, "security.capability"))
        except OSError:
            capabilities = False
        if setuid or capabilities:
            how = "setuid root" if setuid else "with file capabilities"
            checks.append(Check(OK, name, f"{path}, {how}"))
        else:
            checks.append(Check(FAIL, name, f"{path} is neither setuid nor has file capabilities",
                                f"as root: chmod u+s {path}"))
    return checks


def checkSession(user: pwd.struct_passwd, linger: str = LINGER) -> list[Check]:
    runtime = f"/run/user/{user.pw_uid}"
    lingers = os.path.exists(os.path.join(linger, user.pw_name))
    checks = []
    try:
        st = os.stat(runtime)
    except OSError:
        checks.append(Check(FAIL, "runtime directory", f"{runtime} does not exist (not logged in, no linger)",
                            f"as root: loginctl enable-linger {user.pw_name}"))
    else:
        if st.st_uid == user.pw_uid:
            checks.append(Check(OK, "runtime directory", runtime))
        else:
            checks.append(Check(FAIL, "runtime directory", f"{runtime} belongs to uid {st.st_uid}",
                                f"as root: loginctl terminate-user {user.pw_name}"))
    if lingers:
        checks.append(Check(OK, "linger", "on: the daemon keeps running after logout"))
    else:
        checks.append(Check(WARN, "linger", "off: the daemon stops at logout (unless the router starts it on demand)",
                            f"as root: loginctl enable-linger {user.pw_name}"))
    return checks


def ping(path: str) -> tuple[Optional[int], str]:
    """
    Connect to C{path} and ask C{GET /_ping}: the daemon's uid (from
    C{SO_PEERCRED}) and its answer, or C{None} and why not.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(PING_TIMEOUT)
            sock.connect(path)
            uid = peerCredentials(sock).uid
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = b""
            # A daemon that trickles or never ends is cut short.
            deadline = time.monotonic() + PING_TIMEOUT
            while len(answer) < 65536 and time.monotonic() < deadline:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
    except OSError as e:
        return None, e.strerror or str(e)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
    return uid, f"{status} {body.decode('utf-8', 'replace').strip()}".strip()


def pingAs(user: pwd.struct_passwd, path: str) -> tuple[Optional[int], str]:
    """L{ping}, with C{user}'s rights: in this process, or a child with their uid."""
    if os.geteuid() == user.pw_uid:
        return ping(path)
    try:
        child = subprocess.run(
            [sys.executable, "-I", "-m", "dockerrouter.doctor", "ping", path],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
            capture_output=True,
            text=True,
            timeout=PING_TIMEOUT * 2,
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
        )
    except subprocess.TimeoutExpired:
        return None, f"no answer within {PING_TIMEOUT * 2:g} seconds"
    try:
        uid, said = json.loads(child.stdout)
    except ValueError:
        return None, (child.stderr.strip().splitlines() or ["the check failed"])[-1]
    return uid, said


def checkChain(user: pwd.struct_passwd, resolver: BackendResolver, asRoot: bool) -> tuple[list[Check], bool]:
    """
    Each socket of the chain the router's resolver gives the user (its
    rules, owner and chain), in the router's order: the first that is
    there decides (a socket of anyone but the daemon's owner is refused at
    once; one that refuses lets the next be tried).  Also whether one
    answers.
    """
    try:
        with connectionAs(user) as client:
            credentials = peerCredentials(client)
            route = resolver.resolve(credentials, resolver.judge(credentials, client))
    except BackendUnusable as reason:
        return [Check(FAIL, "route", resolver.advice.render(reason))], False
    except (OSError, subprocess.SubprocessError) as e:
        return [Check(FAIL, "route", f"cannot connect as {user.pw_name} to ask the router's resolver: {e}")], False
    checks, usable, decided, stale = [], False, False, False
    eyes = f" (pinged as {user.pw_name})" if asRoot else ""
    for backend in route.candidates:
        path, owner = backend.path, backend.owner
        whose = user.pw_name if owner == user.pw_uid else _owner(owner)
        what = f"socket {path}"
        if decided:
            checks.append(Check(NOTE, what, "not tried (an earlier one decides)"))
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            checks.append(Check(NOTE, what, "missing"))
            continue
        except OSError as e:
            checks.append(Check(WARN, what, f"cannot look: {e.strerror}"))
            continue
        if not stat.S_ISSOCK(st.st_mode):
            checks.append(Check(FAIL, what, "is not a socket", f"rm {path}"))
            continue
        if st.st_uid != owner:
            decided = True
            checks.append(Check(FAIL, what, f"belongs to {_owner(st.st_uid)}, not to {whose}: "
                                "docker-router refuses to connect you to it",
                                f"rm {path} (and point it at your own daemon, or remove the link)"))
            continue
        yours = "yours" if owner == user.pw_uid else f"{whose}'s, as a rule says"
        uid, said = pingAs(user, path)
        if uid is None:
            checks.append(Check(WARN, what, f"{yours}, but refuses connections ({said}){eyes}"))
            stale = True
            continue
        decided = True
        if uid != owner:
            checks.append(Check(FAIL, what, f"answered by a daemon running as {_owner(uid)}, not as "
                                f"{whose}: docker-router refuses it", f"rm {path}"))
        elif said.split()[1:2] == ["200"]:
            usable = True
            checks.append(Check(OK, what, f"{yours}, answers _ping{eyes}"))
        else:
            checks.append(Check(FAIL, what, f"{yours}, but _ping said {said!r}{eyes}",
                                "systemctl --user restart docker"))
    if not usable and not decided:
        checks.append(Check(FAIL, "daemon", "no socket of the chain answers", _startCommand(user, stale, asRoot)))
    return checks, usable


def _startCommand(user: pwd.struct_passwd, stale: bool, asRoot: bool) -> str:
    """What starts the user's daemon: set it up first if it never was."""
    unit = os.path.join(user.pw_dir, ".config", "systemd", "user", "docker.service")
    if stale:
        command = "systemctl --user restart docker"
    elif os.path.exists(unit):
        command = "systemctl --user start docker"
    else:
        command = f"{findSetupTool()} install --force && systemctl --user enable --now docker"
    return f"as {user.pw_name}: {command}" if asRoot else command


def checkProvisioned(user: pwd.struct_passwd, records: str = PROVISION_RECORDS) -> list[Check]:
    """Whether the router set this user's daemon up (--provision), and when: its record says."""
    try:
        with open(os.path.join(records, f"{user.pw_uid}.json"), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return []
    return [Check(NOTE, "set up by docker-router", f"rootless {record.get('kind')} at {record.get('at')} "
                  f"({', '.join(record.get('steps', []))})")]


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def checkSetupTool() -> Check:
    found = locateSetupTool()
    if found is None:
        return Check(WARN, "setup tool", f"{SETUP_TOOL} not found", "as root: apt-get install docker.io rootlesskit")
    return Check(OK, "setup tool", os.path.realpath(found))


def checkClientConfig(user: pwd.struct_passwd, environ: Optional[dict]) -> list[Check]:
    """DOCKER_HOST, DOCKER_CONTEXT, or a docker context that goes around the router."""
    checks = []
    if environ is None:
        checks.append(Check(OK, "DOCKER_HOST", f"not checked: the environment is {user.pw_name}'s own"))
    else:
        host = environ.get("DOCKER_HOST")
        if host and host.rstrip("/") not in ROUTER_HOSTS:
            checks.append(Check(WARN, "DOCKER_HOST", f"{host} bypasses /var/run/docker.sock",
                                "unset DOCKER_HOST (and remove it from your shell's profile)"))
        else:
            checks.append(Check(OK, "DOCKER_HOST", host or "not set"))
        if environ.get("DOCKER_CONTEXT") not in (None, "", "default"):
            checks.append(Check(WARN, "DOCKER_CONTEXT", f"{environ['DOCKER_CONTEXT']} bypasses /var/run/docker.sock",
                                "unset DOCKER_CONTEXT"))
    config = os.path.join(user.pw_dir, ".docker", "config.json")
    context = _currentContext(config)
    if context not in (None, "", "default"):
        checks.append(Check(WARN, "docker context", f"{context!r} (in {config}) bypasses /var/run/docker.sock",
                            "docker context use default"))
    else:
        checks.append(Check(OK, "docker context", "default"))
    return checks


def _currentContext(config: str) -> Optional[str]:
    """
    The docker CLI's current context in a user's C{config.json}.  Root may
    be reading another user's file: a regular file only (not a FIFO that
    would hang, nor a link to a device), and not a large one.
    """
    try:
        fd = os.open(config, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            context = json.loads(f.read(1 << 20)).get("currentContext")
        except (ValueError, AttributeError):
            return None
    return context if isinstance(context, str) else None


class ConfigProblem(Exception):
    """The configuration file says something the router would refuse."""


def configuredResolver(path: str = DEFAULT_CONFIG) -> BackendResolver:
    """
    The router's resolver, from the routing its configuration file gives
    (C{user-socket}, C{[[rule]]}, C{subuid-file}, C{no-subuid}, C{advice}),
    built as the router builds it; the defaults when there is no file.

    @raise ConfigProblem: for a file the router would refuse.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigProblem(f"cannot read {path}: {e}")
    try:
        values = tomllib.loads(text)
        templates = values.get("user-socket", [])
        templates = [templates] if isinstance(templates, str) else templates
        if not (isinstance(templates, list) and all(isinstance(t, str) for t in templates)):
            raise ConfigProblem(f"{path}: user-socket must be a list of strings")
        for template in templates:
            checkTemplate(template)
        rules = parseRules(values.get("rule", []), lambda number: f"{path}, rule {number}") if "rule" in values else ()
    except (tomllib.TOMLDecodeError, RuleError, ValueError) as e:
        raise ConfigProblem(f"{path}: {e}")
    site, subuids = values.get("advice"), values.get("subuid-file", DEFAULT_SUBUID_FILE)
    subordinates = subordinatesFrom(None if values.get("no-subuid") is True else str(subuids),
                                    lambda text: None, time.monotonic)
    return resolverFrom(templates, subordinates, site if isinstance(site, str) else None, rules, Lookups())


def connectionAs(user: pwd.struct_passwd) -> socket.socket:
    """
    A connection from a process with C{user}'s uid, primary and
    supplementary groups, as the router would accept it (the kernel
    records them): this process, or a child with their rights.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("")  # an abstract address of the kernel's choosing
        listener.listen(1)
        listener.settimeout(PING_TIMEOUT)
        address = listener.getsockname()
        if os.geteuid() == user.pw_uid:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(address)
                return listener.accept()[0]
        subprocess.run(
            [sys.executable, "-I", "-m", "dockerrouter.doctor", "connect", address[1:].hex()],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
            capture_output=True,
            timeout=PING_TIMEOUT * 2,
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            check=True,
        )
        # The child has gone; the kernel keeps what it recorded at connect.
        return listener.accept()[0]


def diagnose(user: pwd.struct_passwd, config: str, environ: Optional[dict]) -> tuple[list[Check], bool]:
    """Every check for C{user}; and whether they can use Docker."""
    asRoot = os.geteuid() != user.pw_uid
    checks = checkSubordinates(user) + checkIdMappers() + checkSession(user) + checkProvisioned(user)
    try:
        resolver = configuredResolver(config)
    except ConfigProblem as e:
        checks.append(Check(FAIL, "configuration", f"{e}; the router would refuse it", f"correct {config}"))
        return checks, False
    chain, usable = checkChain(user, resolver, asRoot)
    checks += chain
    checks.append(checkSetupTool())
    checks += checkClientConfig(user, environ)
    return checks, usable and not any(c.status == FAIL for c in checks)


def _lookUp(name: str) -> Optional[pwd.struct_passwd]:
    """A user by name, or by number."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else None
    except KeyError:
        return None


def run(name: Optional[str], config: str, out: TextIO, err: TextIO = sys.stderr) -> int:
    """The C{doctor} subcommand: 0 when the user can use Docker, 1 when not, 2 on misuse."""
    me = os.geteuid()
    user = _lookUp(name) if name else pwd.getpwuid(me)
    if user is None:
        err.write(f"docker-router doctor: no user {name!r}\n")
        return 2
    if me not in (0, user.pw_uid):
        err.write("docker-router doctor: only root can check another user\n")
        return 2
    environ = dict(os.environ) if me == user.pw_uid else None
    checks, usable = diagnose(user, config, environ)
    eyes = "" if me == user.pw_uid else f" (by root: files as root sees them, daemons pinged as {user.pw_name})"
    out.write(f"docker-router doctor for {user.pw_name} (uid {user.pw_uid}){eyes}\n")
    for check in checks:
        out.write(check.line() + "\n")
    out.write("Docker works for you through docker-router.\n" if usable
              else "Docker can't be used yet: run the fixes above.\n")
    return 0 if usable else 1


if __name__ == "__main__" and sys.argv[1:2] == ["ping"]:
    # pingAs's child, running with the user's rights.
    print(json.dumps(ping(sys.argv[2])))
elif __name__ == "__main__" and sys.argv[1:2] == ["connect"]:
    # connectionAs's child: the connection carries the user's credentials.
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(b"\0" + bytes.fromhex(sys.argv[2]))
