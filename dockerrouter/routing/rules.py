"""
What decides where a client goes before any socket is touched: the rules of
the configuration file, and the user database answers that routing needs
(names, homes, the numbers of named users and groups), looked up off the
reactor thread.

A rule can only say I{where} to look and I{who} the daemon there must be;
whether the daemon reached is that one is L{dockerrouter.routing.reasons.verifyDaemon}'s
check,
made on the daemon actually connected.
"""

import grp
import os
import pwd
from typing import Any, Callable, Optional, Union

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


@frozen
class Account:
    """
    A uid's entry in the user database: its name (the uid as text when there
    is none, so that it still routes by number) and home (C{None} then).
    """

    name: str
    home: Optional[str] = None


def accountOf(uid: int) -> Account:
    """C{uid}'s L{Account}, from NSS (so LDAP and SSSD users have one too)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Account(str(uid))
    return Account(entry.pw_name, entry.pw_dir or None)


def uidOf(name: str) -> Optional[int]:
    """The uid of the user called C{name}, or C{None}."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def gidOf(name: str) -> Optional[int]:
    """The gid of the group called C{name}, or C{None}."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class NeedLookup(Exception):
    """
    An answer routing needs is not known yet: it is being looked up in a
    thread, and C{deferred} fires (with C{None}) once it is known, or fails
    with the lookup's failure.  Routing is then tried again from the start:
    it is pure and cheap, and now finds the answer remembered.
    """

    def __init__(self, deferred: Deferred) -> None:
        super().__init__()
        self.deferred = deferred


class Lookups:
    """
    The user database answers routing needs, each remembered for C{ttl}
    seconds: an NSS lookup (a scan of C{/etc/passwd}, or a round trip to
    LDAP) per connection would cost more than the relay, and a renamed user
    may wait a minute for their new path.

    With C{inThread} (the router's), an answer not remembered is looked up
    by C{inThread(function, key)}, off the reactor thread, and the caller is
    told so with L{NeedLookup}: one slow LDAP server then holds only the
    connections that wait for its answer.  One lookup per key is in flight
    at a time, however many connections wait for it.  Without C{inThread}
    (tests, tools) the lookup is made at once.
    """

    def __init__(
        self,
        clock: Callable[[], float] = lambda: 0.0,
        inThread: Optional[Callable[..., Deferred]] = None,
        ttl: float = 60.0,
        account: Callable[[int], Account] = accountOf,
        uid: Callable[[str], Optional[int]] = uidOf,
        gid: Callable[[str], Optional[int]] = gidOf,
    ) -> None:
        self._clock = clock
        self._inThread = inThread
        self._ttl = ttl
        self._account = account
        self._uid = uid
        self._gid = gid
        self._known: dict[tuple[str, Any], tuple[float, Any]] = {}
        self._waiting: dict[tuple[str, Any], list[Deferred]] = {}

    def account(self, uid: int) -> Account:
        """@raise NeedLookup: while it is looked up."""
        value: Account = self._get("account", self._account, uid)
        return value

    def uid(self, name: str) -> Optional[int]:
        """@raise NeedLookup: while it is looked up."""
        value: Optional[int] = self._get("uid", self._uid, name)
        return value

    def gid(self, name: str) -> Optional[int]:
        """@raise NeedLookup: while it is looked up."""
        value: Optional[int] = self._get("gid", self._gid, name)
        return value

    def _get(self, kind: str, function: Callable[[Any], Any], key: Any) -> Any:
        known = self._known.get((kind, key))
        if known is not None and known[0] > self._clock():
            return known[1]
        if known is not None and self._inThread is not None:
            # Expired: answer with it while one lookup refreshes it, so that
            # a hung user database holds no one it had answered before.
            if (kind, key) not in self._waiting:
                self._waiting[(kind, key)] = []
                self._inThread(function, key).addCallbacks(
                    self._found, self._failed, callbackArgs=(kind, key), errbackArgs=(kind, key)
                )
            return known[1]
        if self._inThread is None:
            return self._remember(function(key), kind, key)
        waiter: Deferred = Deferred()
        waiting = self._waiting.get((kind, key))
        if waiting is not None:
            waiting.append(waiter)
        else:
            self._waiting[(kind, key)] = [waiter]
            self._inThread(function, key).addCallbacks(
                self._found, self._failed, callbackArgs=(kind, key), errbackArgs=(kind, key)
            )
        raise NeedLookup(waiter)

    def _remember(self, value: Any, kind: str, key: Any) -> Any:
        if len(self._known) > 100_000:
            self._known.clear()
        self._known[(kind, key)] = (self._clock() + self._ttl, value)
        return value

    def _found(self, value: Any, kind: str, key: Any) -> None:
        self._remember(value, kind, key)
        for waiter in self._waiting.pop((kind, key)):
            waiter.callback(None)

    def _failed(self, failure: Failure, kind: str, key: Any) -> None:
        known = self._known.get((kind, key))
        if known is not None:
            # A failed refresh: the last answer stands for another while.
            self._remember(known[1], kind, key)
        for waiter in self._waiting.pop((kind, key)):
            waiter.errback(failure)


# A rule's match: a uid, a user (name or uid), a group (name or gid).
Match = Union[int, str]


@frozen
class Rule:
    """
    One C{[[rule]]} of the configuration file: who it is for, and either
    the chain of sockets they go to (with the uid their daemon must run as,
    C{None} for the client itself) or the message that refuses them.

    @ivar where: the rule's place in the file, for messages.
    """

    where: str
    uids: tuple[int, ...] = ()
    users: tuple[Match, ...] = ()
    groups: tuple[Match, ...] = ()
    sockets: tuple[str, ...] = ()
    owner: Optional[Match] = None
    deny: Optional[str] = None

    def matches(self, uid: int, gids: frozenset[int], lookups: Lookups, allGroups: bool = True) -> bool:
        """
        Whether the rule is for a client of C{uid} in the groups C{gids}.
        When C{gids} may not be all of the client's groups (C{allGroups}
        false), a rule by group fails closed: a denial applies, a route is
        not granted.

        @raise NeedLookup: while a name is looked up.
        """
        if uid in self.uids:
            return True
        for user in self.users:
            if (user if isinstance(user, int) else lookups.uid(user)) == uid:
                return True
        for group in self.groups:
            if (group if isinstance(group, int) else lookups.gid(group)) in gids:
                return True
        return bool(self.groups) and not allGroups and self.deny is not None


def fillTemplate(template: str, uid: int, user: str, home: Optional[str]) -> str:
    """
    The socket path C{template} names for a user: the one place a template
    is filled in (the resolver's candidates, and L{checkTemplate}'s trial).
    """
    return template.format(uid=uid, user=user, home=home)


def checkTemplate(template: str) -> None:
    """
    A socket path template must be absolute, and fill in nothing but
    C{{uid}}, C{{user}} and C{{home}}.

    @raise ValueError: saying what is wrong.
    """
    try:
        path = fillTemplate(template, 0, "root", "/root")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"bad user-socket {template!r}: only {{uid}}, {{user}} and {{home}} can be "
            f"filled in ({e!r})"
        )
    if not os.path.isabs(path):
        raise ValueError(f"user-socket must be an absolute path: {template!r}")


class RuleError(ValueError):
    """A rule of the file is wrong (the message says which and why)."""


def _matches(table: dict, key: str, where: str, numbers: bool) -> tuple:
    value = table.get(key, [])
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (numbers and not isinstance(v, int)):
            kind = "numbers" if numbers else "names or numbers"
            raise RuleError(f"{where}: {key} must be {kind}, not {v!r}")
        if isinstance(v, int) and not 0 <= v < 2**32:
            raise RuleError(f"{where}: {key} {v} is not a valid id")
    return tuple(values)


def parseRules(tables: Any, where: Callable[[int], str]) -> tuple[Rule, ...]:
    """
    The rules of a file's C{[[rule]]} tables.

    @param where: the place of the rule numbered from 1, for messages.
    @raise RuleError: naming the rule.
    """
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleError(f"{where(1)}: rule must be [[rule]] tables")
    rules = []
    for number, table in enumerate(tables, 1):
        at = where(number)
        unknown = set(table) - {"uid", "user", "group", "user-socket", "owner", "deny"}
        if unknown:
            raise RuleError(f"{at}: unknown key {sorted(unknown)[0]!r}")
        uids = _matches(table, "uid", at, numbers=True)
        users = _matches(table, "user", at, numbers=False)
        groups = _matches(table, "group", at, numbers=False)
        if not (uids or users or groups):
            raise RuleError(f"{at}: a rule needs uid, user or group")
        deny = table.get("deny")
        sockets = table.get("user-socket")
        owner = table.get("owner")
        if (deny is None) == (sockets is None):
            raise RuleError(f"{at}: a rule needs either user-socket or deny")
        if deny is not None:
            if not isinstance(deny, str) or not deny.strip():
                raise RuleError(f"{at}: deny must be a message")
            if owner is not None:
                raise RuleError(f"{at}: owner goes with user-socket, not deny")
            rules.append(Rule(at, uids, users, groups, deny=deny))
            continue
        if isinstance(sockets, str):
            sockets = [sockets]
        if not (isinstance(sockets, list) and sockets and all(isinstance(s, str) for s in sockets)):
            raise RuleError(f"{at}: user-socket must be a list of paths")
        for template in sockets:
            try:
                checkTemplate(template)
            except ValueError as e:
                raise RuleError(f"{at}: {e}")
        if owner is not None:
            if isinstance(owner, list):
                raise RuleError(f"{at}: owner must be one uid or user name")
            (owner,) = _matches({"owner": owner}, "owner", at, numbers=False)
        rules.append(Rule(at, uids, users, groups, tuple(sockets), owner))
    return tuple(rules)
