"""
What doctor reads of a user's files when root checks them for that user.
"""

import os
import pwd

from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.doctor import _currentContext, checkSession


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
