"""
One connection's life: the protocol and its factory, the splice, the
in-flight budget, the error responder, accept control, the plain settings
it reads (L{settings}) and what it counts for others to read (L{stats}).

Imports routing, base and defaults; nothing of the service (configuration
files, metrics, systemd).
"""
