"""
The process around the relay: the twistd plugin's service (L{tap}), the
configuration file and its reload, metrics, the control endpoint, logging
to files and the journal, systemd notification, on-demand daemon starts.

It builds the relay's settings and reads its counters; nothing below it
imports it, and it imports no console script.
"""
