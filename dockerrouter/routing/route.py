"""
Where a client may go: the values the resolver makes and every reason
speaks of (kept apart from the resolver, which raises those reasons).
"""

from attrs import Factory, field, frozen


@frozen
class Backend:
    """
    One place a client's connection may go, and who must be listening there.

    @ivar uid: the uid the connection is for (the client's, or its
        subordinate uid's owner): counted against caps, named in messages.
    @ivar user: the name of that uid, or the uid as text when the user
        database has none (the connection still routes by number).
    @ivar owner: the uid the daemon at C{path} must run as: C{uid}, unless
        a rule names another.
    @ivar template: the configured path C{path} was made from (a bounded
        label for metrics).
    """

    path: str
    uid: int
    user: str
    owner: int = field(default=Factory(lambda self: self.uid, takes_self=True))
    template: str = ""


@frozen
class Route:
    """Where a client may go: the candidates, tried in order."""

    candidates: tuple[Backend, ...]
