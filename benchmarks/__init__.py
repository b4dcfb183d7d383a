"""
Benchmarks for docker-router (issue 4).

Measures the router against a direct connection to the backend (the limit),
socat, systemd-socket-proxyd and a naive Twisted relay built on
L{twisted.protocols.portforward}, on this machine, in one run, interleaved and
repeated.  Run C{python -m benchmarks --help} from the repository root.
"""
