"""
One connection's life: the protocol (L{protocol}) and its factory
(L{factory}), reaching a daemon's socket file in a worker (L{sockets},
L{workers}), the splice (L{splice}), the in-flight budget (L{budget}), the
error responder (L{errors}), accept control (L{limits}), the plain settings
it reads (L{settings}) and what it counts for others to read (L{stats}).

Imports routing, base and defaults; nothing of the service (configuration
files, metrics, systemd).
"""
