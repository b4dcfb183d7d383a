"""
Rules with the real docker CLI: a group sent to another user's real daemon,
and a user refused with the site's message.
"""

import dataclasses
import os
import subprocess

import pytest

from tests.e2e.harness import Docker, startRouter, uniqueName, whichDocker

DENIED = "Docker is not for dr-alice on this host; see https://wiki.example/docker"


@pytest.fixture
def testGroup():
    """A group of its own in the user database (its name is looked up), removed after."""
    name = uniqueName("dre2e")[:30]
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    yield name, int(subprocess.run(["getent", "group", name], check=True, capture_output=True, text=True).stdout.split(":")[2])
    subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def ruledRouter(environment, tmpRoot, testGroup):
    bob = environment["dr-bob"]
    config = os.path.join(tmpRoot, uniqueName("rules") + ".toml")
    with open(config, "w") as f:
        f.write(
            f'[[rule]]\nuser = "dr-alice"\ndeny = "{DENIED}"\n\n'
            f'[[rule]]\ngroup = "{testGroup[0]}"\nuser-socket = ["{bob.ownSocket}"]\nowner = "dr-bob"\n'
        )
    router = startRouter(tmpRoot, args=["--config", config])
    yield router
    router.stop()
    assert "Traceback" not in router.log(), router.evidence()


def test_groupRuleReachesAnotherDaemon(environment, ruledRouter, testGroup, image):
    """
    dr-carol (no daemon of her own) in the rule's group lists dr-bob's
    containers through the router, as dr-bob does on his own socket; out of
    the group she is told that she has no daemon, with each path tried.
    """
    carol, bob = environment["dr-carol"], environment["dr-bob"]
    cli = whichDocker()
    direct = Docker(cli, bob, bob.ownSocket, "direct")
    grouped = Docker(cli, dataclasses.replace(carol, groups=(testGroup[1],)), ruledRouter.listenPath, "router")
    name = uniqueName("rule")
    try:
        direct.run("create", "--name", name, "--network", "none", image, "true")
        listed = grouped.out("ps", "-a", "--format", "{{.Names}}").split()
        assert name in listed
        assert sorted(listed) == sorted(direct.out("ps", "-a", "--format", "{{.Names}}").split())
        assert grouped.out("info", "--format", "{{.ID}}") == direct.out("info", "--format", "{{.ID}}")
    finally:
        direct.removeContainers(name)
    alone = Docker(cli, carol, ruledRouter.listenPath, "router").run("ps", check=False)
    assert alone.returncode != 0
    assert b"No Docker daemon is running for user dr-carol (uid %d): tried /run/user/%d/docker.sock" % (
        carol.uid, carol.uid) in alone.stderr, alone.stderr


def test_denyRuleAtTheCli(environment, ruledRouter):
    """The docker CLI prints the site's message as it is."""
    alice = environment["dr-alice"]
    refused = Docker(whichDocker(), alice, ruledRouter.listenPath, "router").run("ps", check=False)
    assert refused.returncode != 0
    assert refused.stderr.decode().strip() == f"Error response from daemon: {DENIED}."
