"""
docker-router: give every user of a shared host C{/var/run/docker.sock}, each
routed to their own rootless Docker daemon, without giving anyone root.
"""

__version__ = "0.1.0"
