"""
The router's resolver as its configuration describes it, built the same way
by the daemon (on start and on each reload) and by C{docker-router doctor},
which asks it what a user gets.
"""

from typing import Any, Callable, Optional, Sequence

from dockerrouter.defaults import DEFAULT_CHAIN
from dockerrouter.routing.advice import Advice, findSetupTool
from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.routing.subordinates import SubordinateIds, loginDefsUidMin
from dockerrouter.routing.rules import Lookups, Rule


def subordinatesFrom(
    path: Optional[str],
    warn: Callable[[str], None],
    clock: Callable[[], float],
    inThread: Optional[Callable[..., Any]] = None,
) -> Optional[SubordinateIds]:
    """
    The subordinate uid ranges in the file at C{path}; C{None} for none
    (C{no-subuid}).  The daemon gives C{inThread}, so that the file and its
    names are read off the reactor (see L{SubordinateIds}).
    """
    if path is None:
        return None
    return SubordinateIds(path, warn=warn, clock=clock, uidMin=loginDefsUidMin(), inThread=inThread)


def resolverFrom(
    templates: Sequence[str],
    subordinates: Optional[SubordinateIds],
    site: Optional[str],
    rules: Sequence[Rule],
    lookups: Lookups,
) -> BackendResolver:
    """
    The resolver of C{user-socket} (the default chain when empty), the
    subordinate ranges, the site's advice and the C{[[rule]]}s.
    """
    return BackendResolver(
        tuple(templates) or DEFAULT_CHAIN,
        subordinates=subordinates,
        advice=Advice(findSetupTool(), site),
        rules=rules,
        lookups=lookups,
    )
