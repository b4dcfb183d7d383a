"""
The name installed unit files give twistd (C{--logger=dockerrouter.journal.observer}):
it must keep working across upgrades.  The observer lives in
L{dockerrouter.service.journal}.
"""

from dockerrouter.service.journal import observer

__all__ = ["observer"]
