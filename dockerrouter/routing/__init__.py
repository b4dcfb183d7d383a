"""
Who the client is and which daemon it may reach: credentials
(L{credentials}), the user namespace a client runs in (L{namespaces}),
subordinate id ranges (L{subordinates}), rules and user database lookups
(L{rules}), what the client may see of a path (L{visibility}), the resolver
(L{resolver}) and the values it makes (L{route}), every reason a daemon
can't be used (L{reasons}), the advice users read (L{advice}), and the
resolver as the configuration describes it (L{configured}).

Imports nothing of the relay or the service, and no reactor module: the
console scripts use it too.
"""
