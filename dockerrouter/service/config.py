"""
The configuration file, and reloading it.

The file is TOML with one top-level key per long command-line option
(C{max-connections-per-user = 50}; a list for a repeatable one, C{metrics =
["unix:..."]}; C{true} for a flag).  What the command line gives wins over
the file.  What the factory needs for a new connection is one
L{Settings<dockerrouter.relay.settings.Settings>},
replaced whole on reload: nothing changes under a live relay, and a reload
can't be half applied.
"""

import os
import re
import tomllib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from dockerrouter.base._compat import recordGivenOptions
from dockerrouter.defaults import DEFAULT_CONFIG
from dockerrouter.relay.limits import connectionsFor
from dockerrouter.relay.settings import Settings
from dockerrouter.routing.configured import resolverFrom, subordinatesFrom
from dockerrouter.routing.subordinates import SubordinateIds
from dockerrouter.routing.rules import Lookups, Rule, RuleError, gidOf, parseRules

if TYPE_CHECKING:
    from dockerrouter.relay.factory import RouterFactory

    class _ThreadedClock(IReactorTime, IReactorThreads):
        """
        A reactor as L{settingsFrom} uses it: a type only, like Twisted's own
        C{_IReactorCommon} (Python has no intersection type).
        """

# Options that take a restart: what the router listens on, and the in-flight
# budget live relays hold grants of; and who sets up users' daemons.
RESTART_ONLY = (
    "listen", "metrics", "control", "max-in-flight", "max-in-flight-per-user",
    "provision", "provision-group", "provision-subids", "provision-timeout",
)
REPEATABLE = ("listen", "metrics", "user-socket")


class ConfigError(Exception):
    """The file can't be read, does not parse, or says something invalid."""


class FileOptions(usage.Options):
    """
    Command-line options that a configuration file can also give: it
    remembers which options the command line gave (they win), and
    L{readConfigFile} fills in the rest from the file.
    """

    # The tables usage.Options reads from a subclass; a file is checked against them too.
    optParameters: ClassVar[list[list[object]]]
    optFlags: ClassVar[list[list[object]]]

    def __init__(self) -> None:
        super().__init__()
        self.given: set[str] = set()
        self.commandLine: dict[str, Any] = {}
        recordGivenOptions(self, self.given.add)

    def readConfigFile(self) -> None:
        """
        Call first in C{postOptions}: set what the file says and the command
        line did not.

        @raise usage.UsageError: naming the file and the line.
        """
        self.commandLine = {
            name: list(self[name]) if name in REPEATABLE else self[name] for name in self.given
        }
        path = configPath(self["config"])
        if path is not None:
            try:
                applyFile(self, path)
            except ConfigError as e:
                raise usage.UsageError(str(e))

    def fromCommandLine(self) -> "FileOptions":
        """New options with what the command line gave, and no file read yet."""
        fresh = type(self)()
        fresh.given = set(self.given)
        for name, value in self.commandLine.items():
            fresh[name] = list(value) if isinstance(value, list) else value
        return fresh


def settingsFrom(
    options: FileOptions, reactor: "_ThreadedClock", descriptorLimit: int, warn: Callable[[str], None]
) -> Settings:
    """The L{Settings} that C{options} give."""
    subordinates = subordinatesFrom(
        None if options["no-subuid"] else options["subuid-file"], warn, reactor.seconds, _inThreads(reactor)
    )
    warnSubordinateGroups(options["rule"], options["subgid-file"], _inThreads(reactor), warn)
    return Settings(
        resolver=resolverFrom(
            options["user-socket"],
            subordinates,
            options["advice"],
            options["rule"],
            Lookups(reactor.seconds, _inThreads(reactor)),
        ),
        connectTimeout=options["connect-timeout"],
        maxConnections=options["max-connections"] or connectionsFor(descriptorLimit),
        maxConnectionsPerUser=options["max-connections-per-user"],
        shutdownTimeout=options["shutdown-timeout"],
        usersKept=options["metrics-users"] if options["metrics-per-user"] else 0,
        subordinates=subordinates,
        # Provisioning goes through the user's systemd manager.
        start=options["start"] or ("systemd" if options["provision"] else None),
        startTimeout=options["start-timeout"],
    )


def warnSubordinateGroups(
    rules: tuple[Rule, ...], subgidFile: str, inThread: Callable[..., Any], warn: Callable[[str], None]
) -> None:
    """
    Warn about each group of C{rules} whose gid lies inside a subordinate
    gid range of C{subgidFile}: its owner's containers run with it, and
    only a client in the router's own user namespace is matched by it.
    Group names are looked up, and the file read, in a thread (C{inThread}):
    a reload runs in the reactor.
    """
    groups = [(rule.where, group) for rule in rules for group in rule.groups]
    if not groups:
        return

    def find() -> list[str]:
        # Every owner's range counts here, a system account's too.
        ranges = SubordinateIds(subgidFile, warn=lambda text: None, clock=lambda: 0.0, uidMin=0)
        found = []
        for where, group in groups:
            gid = group if isinstance(group, int) else gidOf(group)
            if gid is not None and ranges.owner(gid) != gid:
                found.append(
                    f"{where}: group {group} is gid {gid}, inside the subordinate gid range of "
                    f"uid {ranges.owner(gid)} in {subgidFile}: that user's containers can run "
                    "with it (the rule matches it only for clients in the router's own user namespace)"
                )
        return found

    def say(found: list[str]) -> None:
        for text in found:
            warn(text)

    inThread(find).addCallback(say)


def _inThreads(reactor: IReactorThreads) -> Callable[..., Any]:
    """Run a lookup in the reactor's thread pool (made when first needed)."""

    def inThread(function: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    return inThread


def configPath(given: Optional[str]) -> Optional[str]:
    """The file to read: the one given, or the default one if it exists."""
    if given:
        return given
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def readFile(path: str) -> tuple[dict[str, Any], str]:
    """
    The file's keys and values, and its text.

    @raise ConfigError: with the line, for a file that does not parse.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}")
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}")


def applyFile(options: FileOptions, path: str) -> None:
    """
    Set in C{options} what the file at C{path} says, except what the
    command line gave (C{options.given}).

    @raise ConfigError: naming the file and the line.
    """
    values, text = readFile(path)
    coercions = {row[0]: row[4] if len(row) > 4 else None for row in options.optParameters}
    flags = {row[0] for row in options.optFlags}
    for key, value in values.items():
        where = f"{path}, line {_lineOf(text, key)}"
        if key == "rule":
            try:
                options["rule"] = parseRules(value, lambda n: _ruleAt(path, text, n))
            except RuleError as e:
                raise ConfigError(str(e))
            continue
        if key == "user-socket" and isinstance(value, str):
            value = [value]
        if key == "provision" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if key in REPEATABLE:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{where}: {key} must be a list of strings")
        elif key in flags:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false")
        elif key in coercions and key != "config":
            coerce = coercions[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ConfigError(f"{where}: {key} must be a single value")
            if coerce is None and not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be a string")
            try:
                value = coerce(str(value)) if callable(coerce) else value
            except ValueError as e:
                raise ConfigError(f"{where}: {key}: {e}")
        else:
            raise ConfigError(f"{where}: unknown option {key!r}")
        if key not in options.given:
            options[key] = value


def _ruleAt(path: str, text: str, number: int) -> str:
    """Where the C{number}th C{[[rule]]} table starts, for messages."""
    starts = [m.start() for m in re.finditer(r"^[ \t]*\[\[[ \t]*rule[ \t]*\]\]", text, re.MULTILINE)]
    line = text.count("\n", 0, starts[number - 1]) + 1 if number <= len(starts) else 1
    return f"{path}, line {line} (rule {number})"


def _lineOf(text: str, key: str) -> int:
    """The line where a top-level key is set (for messages)."""
    match = re.search(r"^[ \t]*[\"']?%s[\"']?[ \t]*=" % (re.escape(key),), text, re.MULTILINE)
    return text.count("\n", 0, match.start()) + 1 if match else 1


class Reloader:
    """
    Re-reads the configuration file and gives the factory new settings.

    New values apply to new connections only; a change that needs a restart
    is refused with a warning, and a file that is wrong changes nothing.
    """

    def __init__(
        self,
        options: FileOptions,
        factory: "RouterFactory",
        build: Callable[[FileOptions], Settings],
        log: Logger,
    ) -> None:
        self.options = options
        self.factory = factory
        self.build = build
        self.log = log
        self.counts = {"ok": 0, "error": 0}

    def __call__(self) -> str:
        """Reload; a few words for the reload's log line."""
        fresh = self.options.fromCommandLine()
        # No file (any more): the command line and the defaults, so that a
        # rule removed with its file is gone after the reload.
        path = configPath(fresh["config"]) or "no configuration file, defaults"
        try:
            fresh.postOptions()
            settings = self.build(fresh)
        except Exception as e:
            self.counts["error"] += 1
            self.log.error(
                "reload: still running with the previous configuration: {error}",
                error=e,
            )
            return f"{path} not applied (error)"
        for key in RESTART_ONLY:
            if fresh[key] != self.options[key]:
                self.log.warn(
                    "reload: {key} changed in {path}, which takes a restart; "
                    "still {old}",
                    key=key,
                    path=path,
                    old=self.options[key],
                )
                fresh[key] = self.options[key]
        self.options = fresh
        self.factory.settings = settings
        self.counts["ok"] += 1
        return f"{path} applied to new connections"
