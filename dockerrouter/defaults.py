"""
The defaults more than one part of docker-router needs: the daemon, its
configuration file and the C{docker-router} command read each one here.

Constants only: this module imports nothing, so every layer may import it.
"""

# Read when it exists (and on SIGHUP); C{docker-router doctor} reads its routing.
DEFAULT_CONFIG = "/etc/docker-router/docker-router.toml"

# Where Docker clients connect.
DEFAULT_LISTEN = "unix:/var/run/docker.sock:mode=666:lockfile=1"

# The control endpoint the router serves and C{docker-router status} reads:
# root's only (0600); the lock file lets a restart after a crash take over a
# stale socket.
DEFAULT_CONTROL = "unix:/run/docker-router/control.sock:mode=600:lockfile=1"

# The default chain: systemd's runtime directory (dockerd-rootless-setuptool
# and Podman's user socket), then where the setup tool puts the socket when
# there is no runtime directory.
DEFAULT_CHAIN = (
    "/run/user/{uid}/docker.sock",
    "/run/user/{uid}/podman/podman.sock",
    "{home}/.docker/run/docker.sock",
)

# The subordinate uid ranges that route a user's container processes to them.
DEFAULT_SUBUID_FILE = "/etc/subuid"
DEFAULT_SUBGID_FILE = "/etc/subgid"

# The command that sets up a user's rootless daemon (moby's), which the
# router's advice names.
SETUP_TOOL = "dockerd-rootless-setuptool.sh"

# Where the router keeps one record per user it set a daemon up for
# (C{--provision}): root's, never in the user's home.
PROVISION_RECORDS = "/var/lib/docker-router/provisioned"
