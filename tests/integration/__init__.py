"""
Integration tests: the real twistd docker-router process, with backends and
clients running as other uids.  They need root.
"""
