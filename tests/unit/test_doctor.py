"""
What doctor reads of a user's files when root checks them for that user,
and of the subordinate id files.
"""

import os
import pwd

from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.doctor import FAIL, NOTE, OK, _currentContext, checkProvisioned, checkSession, checkSubordinates
from dockerrouter.service.provision import writeRecord

ALICE = pwd.struct_passwd(("alice", "x", 1000, 1000, "", "/home/alice", "/bin/sh"))


class CurrentContextTests(SynchronousTestCase):
    def path(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.join(directory, "config.json")

    def test_regularFile(self) -> None:
        config = self.path()
        with open(config, "w") as f:
            f.write('{"currentContext": "remote"}')
        self.assertEqual(_currentContext(config), "remote")

    def test_fifoDoesNotHang(self) -> None:
        """A FIFO in its place (no writer) is not read: it would block."""
        config = self.path()
        os.mkfifo(config)
        self.assertIsNone(_currentContext(config))

    def test_linkNotFollowed(self) -> None:
        config = self.path()
        target = config + ".real"
        with open(target, "w") as f:
            f.write('{"currentContext": "remote"}')
        os.symlink(target, config)
        self.assertIsNone(_currentContext(config))

    def test_notAString(self) -> None:
        config = self.path()
        with open(config, "w") as f:
            f.write('{"currentContext": ["\\u001b[2J"]}')
        self.assertIsNone(_currentContext(config))


class SubordinateTests(SynchronousTestCase):
    """Doctor reads C{/etc/subuid} and C{/etc/subgid} with the router's parser."""

    def etc(self, subuid: str, subgid: str) -> str:
        etc = self.mktemp()
        os.makedirs(etc)
        for name, text in (("subuid", subuid), ("subgid", subgid)):
            with open(os.path.join(etc, name), "w") as f:
                f.write(text)
        return etc

    def test_rangesTheRouterReads(self) -> None:
        """
        A user's ranges by name or uid; a line the router ignores (not a
        positive range, commented out) is none of them.
        """
        etc = self.etc("alice:100000:65536\nalice:0:65536\nalice:200000:0\n#alice:300000:10\n", "1000:100000:65536\n")
        uids, gids = checkSubordinates(ALICE, etc)
        self.assertEqual((uids.status, uids.detail), (OK, f"100000-165535 in {etc}/subuid"))
        self.assertEqual((gids.status, gids.detail), (OK, f"100000-165535 in {etc}/subgid"))

    def test_noRange(self) -> None:
        """Without a usable range, the fix offers one past every other range."""
        etc = self.etc("bob:400000:65536\nalice:0:10\nbroken\n", "")
        uids, gids = checkSubordinates(ALICE, etc)
        self.assertEqual(uids.status, FAIL)
        self.assertEqual(uids.fix, "as root: usermod --add-subuids 465536-531071 alice")
        self.assertEqual(gids.fix, "as root: usermod --add-subgids 100000-165535 alice")


class ProvisionedTests(SynchronousTestCase):
    def test_recordOfTheRouter(self) -> None:
        """doctor says the router set the user up, and when, from the router's record (the same writer)."""
        records = self.mktemp()
        self.assertEqual(checkProvisioned(ALICE, records), [])
        writeRecord(records, dict(user="alice", uid=1000, kind="docker", at="2026-12-07T19:00:00+0000",
                                  steps=["start the user's manager", "enable docker.service"]))
        [check] = checkProvisioned(ALICE, records)
        self.assertEqual(check.status, NOTE)
        self.assertEqual(check.line(), "--    set up by docker-router: rootless docker at 2026-12-07T19:00:00+0000 "
                         "(start the user's manager, enable docker.service)")
        self.assertEqual(os.stat(os.path.join(records, "1000.json")).st_mode & 0o777, 0o644)


class SessionTests(SynchronousTestCase):
    def test_lingerIsTheAdminsFix(self) -> None:
        """
        Issue 19.3: users have no sudo and can't linger themselves: the fix
        says it is root's command, not one the user runs with sudo.
        """
        # A uid with no runtime directory, and no linger.
        user = pwd.struct_passwd(("nobody-here", "x", 4000000, 4000000, "", "/nonexistent", "/bin/sh"))
        linger = self.mktemp()
        os.makedirs(linger)
        fixes = [check.fix for check in checkSession(user, linger) if check.fix]
        self.assertEqual(len(fixes), 2)
        for fix in fixes:
            self.assertEqual(fix, "as root: loginctl enable-linger nobody-here")
