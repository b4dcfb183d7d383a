"""
README.md's install and per-user steps, run as written on a fresh Debian 12 and 13
with C{docker.io} installed before or after the router.
"""

import pytest
from conftest import IMAGE, addUser, installDocker, installRouter, pollUntil


@pytest.mark.parametrize("order", ["docker.io-before", "docker.io-after"])
def test_readmeSteps(machine, order):
    """
    Whichever comes first, the router ends up serving /var/run/docker.sock
    (socket-activated, the distribution's Docker masked), and a new user who
    follows the per-user steps gets C{docker ps} and C{docker run} of a local
    image through it.
    """
    if order == "docker.io-before":
        installDocker(machine)
        installRouter(machine)
    else:
        installRouter(machine)
        installDocker(machine)
    states = machine.run("systemctl is-active docker-router.socket docker.socket docker.service; "
                         "systemctl is-enabled docker-router.socket docker.socket docker.service",
                         check=False).stdout.split()
    # (docker.io's rootful dockerd can't run in this container: installed first, it has failed.)
    assert states[0] == "active" and states[3:] == ["enabled", "masked", "masked"], states
    assert set(states[1:3]) <= {"inactive", "failed"}, states
    uid = addUser(machine, "dr-erin")
    assert machine.run("docker ps -q", user="dr-erin").stdout == ""
    ran = machine.run(f"docker run --rm {IMAGE} sh -c 'echo hello from $(id -u)'", user="dr-erin")
    assert ran.stdout == "hello from 0\n"
    # Through the router, not around it: its record of dr-erin's connections
    # (each written within a tenth of a second of the connection's end).
    def recorded():
        records = machine.run(f"journalctl -u docker-router --no-pager -o cat | grep -c 'uid={uid} '",
                              check=False).stdout
        return int(records or 0) >= 3

    pollUntil(recorded, 10, "the router's records of 3 connections of dr-erin in its journal")
