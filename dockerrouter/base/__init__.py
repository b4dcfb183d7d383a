"""
What every layer may use: the router's logger and its per-connection
records (L{logging}), the Unix socket file an endpoint names
(L{endpoints}), and every reach into Twisted's insides (L{_compat}).

Imports nothing of C{dockerrouter} but L{dockerrouter.defaults}.
"""
