"""
From a client's identity to the daemon it may reach: what the kernel says
of the client, judged once at accept (L{BackendResolver.judge}), then the
first rule that matches it or the default chain, filled in for the user
it routes as (L{BackendResolver.resolve}).

This module knows users, paths and rules; it knows nothing of transports
or protocols.
"""

import socket
from typing import Callable, NamedTuple, Optional, Sequence, Union

from dockerrouter.defaults import DEFAULT_CHAIN
from dockerrouter.routing.advice import Advice
from dockerrouter.routing.credentials import Credentials, peerGroups
from dockerrouter.routing.namespaces import ROUTERS, namespaceOf
from dockerrouter.routing.reasons import Denied, NoRoute
from dockerrouter.routing.route import Backend, Route
from dockerrouter.routing.rules import Account, Lookups, Rule, fillTemplate
from dockerrouter.routing.subordinates import SubordinateIds


class Judged(NamedTuple):
    """
    What the kernel says of a client, judged once, when it is accepted
    (see L{BackendResolver.judge}): routing later uses these facts, never
    a pid looked at again.

    @ivar uid: the uid it is routed as: its own, or, for a process in a
        user's rootless container, that user's.
    @ivar groups: the groups it may be matched by (primary gid included):
        only where the kernel's word is the client's own.
    @ivar allGroups: whether C{groups} are all of them; if not, a rule by
        group fails closed (see L{Rule.matches}).
    """

    uid: int
    groups: frozenset[int]
    allGroups: bool


_NO_GROUPS: frozenset[int] = frozenset()


class BackendResolver:
    """
    Makes the chain of candidate sockets for a client: the first rule that
    matches it, or the default chain, filled in for its own uid or, for a
    process in a user's rootless container, the owning user's.

    A uid in a user's subordinate range is routed to that user only when
    the client runs in a user namespace that user owns (the outermost one
    below the router's): a real account may have a uid inside someone's
    range, and a namespace of someone else's may map it.  Such a client is
    matched by the owner's uid, and by no group (its groups are
    subordinate ids).  Any client's groups count only when it runs in the
    router's own user namespace: in one of its own, a user can map a gid
    of their subordinate range to a group's number, or drop a group.

    @ivar advice: what to tell this host's users (see L{Advice}).
    """

    def __init__(
        self,
        templates: Union[str, Sequence[str]] = DEFAULT_CHAIN,
        lookupName: Optional[Callable[[int], str]] = None,
        subordinates: Optional[SubordinateIds] = None,
        namespaceOf: Callable[
            [socket.socket, Credentials, Optional[frozenset[int]]], Optional[int]
        ] = namespaceOf,
        advice: Optional[Advice] = None,
        rules: Sequence[Rule] = (),
        lookups: Optional[Lookups] = None,
    ) -> None:
        self.templates = (templates,) if isinstance(templates, str) else tuple(templates)
        if lookups is None:
            lookups = Lookups()
            if lookupName is not None:
                lookups = Lookups(account=lambda uid: Account(lookupName(uid)))
        self.lookups = lookups
        self._subordinates = subordinates
        self._namespaceOf = namespaceOf
        self.advice = advice or Advice()
        self.rules = tuple(rules)
        self._needGroups = any(rule.groups for rule in self.rules)
        # (uid, owner, templates) -> (the account it was made with, route):
        # a route is made once per user, and again when their account is
        # looked up anew (see L{Lookups}).
        self._routes: dict[tuple, tuple[Account, Route]] = {}

    def judge(self, client: Credentials, sock: socket.socket) -> Judged:
        """
        What routing may trust of C{client}, connected on C{sock}: read
        once, at accept.  Only a client whose uid is in a subordinate
        range, or every client when rules match groups, has its namespace
        read; for anyone else this makes no system call.
        """
        uid = client.uid
        owner = self._subordinates.owner(uid) if self._subordinates is not None else uid
        if owner == uid and not self._needGroups:
            return Judged(uid, _NO_GROUPS, False)
        claimed = None
        supplementary = None
        if self._needGroups:
            # A client in more groups than the kernel tells (256) is judged
            # by its primary group, and rules by group fail closed.
            supplementary = peerGroups(sock)
            claimed = frozenset({client.gid}) | (supplementary or _NO_GROUPS)
        where = self._namespaceOf(sock, client, claimed)
        if owner != uid and where == owner:
            # A process of the owner's container: no groups on the host.
            return Judged(owner, _NO_GROUPS, False)
        if where == ROUTERS and claimed is not None:
            return Judged(uid, claimed, supplementary is not None)
        return Judged(uid, _NO_GROUPS, False)

    def resolve(self, client: Credentials, judged: Optional[Judged] = None) -> Route:
        """
        The candidates of C{client}, as C{judged} at accept (without it,
        the client routes as its own uid, matched by no group).

        @raise NeedLookup: while an answer of the user database is looked
            up (call again once it fires).
        @raise BackendUnusable: when a rule denies the client.
        """
        if judged is None:
            judged = Judged(client.uid, _NO_GROUPS, False)
        account = self.lookups.account(judged.uid)
        templates, owner = self._matchRules(judged, account)
        key = (judged.uid, owner, templates)
        made = self._routes.get(key)
        if made is not None and made[0] is account:
            return made[1]
        route = self._makeRoute(judged.uid, owner, templates, account)
        self._remember(key, account, route)
        return route

    def _matchRules(self, judged: Judged, account: Account) -> tuple[tuple[str, ...], int]:
        """
        The templates and the uid the daemon must run as, from the first
        rule that matches: the chain and the client's own when none does.

        @raise BackendUnusable: when the rule denies the client, or names
            an owner the user database doesn't know.
        """
        uid, gids, allGroups = judged
        for rule in self.rules:
            if rule.matches(uid, gids, self.lookups, allGroups):
                if rule.deny is not None:
                    raise Denied(Backend("-", uid, account.name), rule.deny)
                return rule.sockets, self._ownerNamed(rule, uid, account)
        return self.templates, uid

    def _ownerNamed(self, rule: Rule, uid: int, account: Account) -> int:
        """The uid whose daemon C{rule} sends its clients to (their own without C{owner})."""
        if rule.owner is None:
            return uid
        named = rule.owner if isinstance(rule.owner, int) else self.lookups.uid(rule.owner)
        if named is None:
            raise NoRoute(
                Backend("-", uid, account.name),
                f"the rule names owner {rule.owner!r}, who is not in the user database",
            )
        return named

    def _makeRoute(self, uid: int, owner: int, templates: tuple[str, ...], account: Account) -> Route:
        """
        The candidates: each template filled in for C{account} (one that
        needs a home directory is left out when there is none).
        """
        candidates = tuple(
            Backend(fillTemplate(template, uid, account.name, account.home), uid, account.name, owner, template)
            for template in templates
            if account.home is not None or "{home}" not in template
        )
        if not candidates:
            raise NoRoute(
                Backend("-", uid, account.name, owner),
                "every socket path needs a home directory, and the user database has none",
            )
        return Route(candidates)

    def _remember(self, key: tuple, account: Account, route: Route) -> None:
        """Keep C{route} for the next connection (a bounded cache: cleared when full)."""
        if len(self._routes) >= 100_000:
            self._routes.clear()
        self._routes[key] = (account, route)
