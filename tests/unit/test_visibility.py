"""
What a user could see of a path, judged by the mode bits along it.
"""

import os
import shutil
import subprocess
import tempfile
import unittest

from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.routing.visibility import Found, Missing, Viewer, look

USER = Viewer(61001, frozenset({61001}))


class LookTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root, to make files of other uids")
        self.top = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.top)
        os.chmod(self.top, 0o755)
        self.secret = self.make("secret", 0o700)
        self.home = self.make("home", 0o700, owner=61001)
        open(os.path.join(self.secret, "exists"), "w").close()

    def make(self, name: str, mode: int, owner: int = 0, group: int = 0) -> str:
        path = os.path.join(self.top, name)
        os.mkdir(path)
        os.chown(path, owner, group)
        os.chmod(path, mode)
        return path

    def link(self, target: str, name: str = "link") -> str:
        path = os.path.join(self.home, name)
        os.symlink(target, path)
        return path

    def test_ownFile(self) -> None:
        path = os.path.join(self.home, "docker.sock")
        open(path, "w").close()
        st = os.stat(path)
        self.assertEqual(look(path, USER), Found(st.st_dev, st.st_ino))

    def test_missingInOwnDirectory(self) -> None:
        path = os.path.join(self.home, "docker.sock")
        self.assertEqual(look(path, USER), Missing(path))

    def test_danglingLink(self) -> None:
        """
        A missing target named by a link: the link and its text.
        """
        target = os.path.join(self.home, "nothing.sock")
        link = self.link(target)
        self.assertEqual(look(link, USER), Missing(target, (link, target)))

    def test_relativeAndChainedLinks(self) -> None:
        inner = self.link("nothing.sock", "inner")
        outer = self.link("./inner", "outer")
        self.assertEqual(
            look(outer, USER), Missing(os.path.join(self.home, "nothing.sock"), (inner, "nothing.sock"))
        )

    def test_linkOnTheWayIsNotDangling(self) -> None:
        """
        A missing file below a directory reached through a link (/var/run)
        is missing, not a dangling link.
        """
        self.link(self.home, "alias")
        path = os.path.join(self.home, "alias", "docker.sock")
        self.assertEqual(look(path, USER), Missing(os.path.join(self.home, "docker.sock")))

    def test_rootOnlyDirectory(self) -> None:
        """
        Through a directory the user can't search, nothing can be told:
        existing or missing alike.
        """
        for name in ("exists", "missing"):
            self.assertIsNone(look(self.link(os.path.join(self.secret, name), name), USER))
        self.assertIsInstance(look(os.path.join(self.secret, "exists"), Viewer(0, frozenset())), Found)

    def test_groups(self) -> None:
        """
        Search by group needs the group, primary or supplementary.
        """
        shared = self.make("shared", 0o710, group=4242)
        path = os.path.join(shared, "docker.sock")
        self.assertIsNone(look(path, USER))
        self.assertEqual(look(path, Viewer(61001, frozenset({61001, 4242}))), Missing(path))

    def test_fileAsDirectoryAndLoop(self) -> None:
        self.assertIsNone(look(os.path.join(self.secret, "exists", "x"), Viewer(0, frozenset())))
        self.link("loop-b", "loop-a")
        self.link("loop-a", "loop-b")
        self.assertIsNone(look(os.path.join(self.home, "loop-a"), USER))

    def test_proc(self) -> None:
        """
        /proc's links lead into other namespaces: nothing there is judged.
        """
        self.assertIsNone(look(self.link(f"/proc/{os.getpid()}/root/etc"), Viewer(0, frozenset())))

    def test_linksThroughADeepTreeEndAtTheBound(self) -> None:
        """
        Three links, each through a 1,500-level tree: more components in all
        than the walk takes (4,096), so it can't tell, though the kernel
        would find the file.
        """
        fd = os.open(self.home, os.O_PATH)
        for _ in range(1500):
            os.mkdir("a", dir_fd=fd)
            inner = os.open("a", os.O_PATH, dir_fd=fd)
            os.close(fd)
            fd = inner
        deep = self.home + "/a" * 1500
        os.symlink(deep + "/l2", "l1", dir_fd=fd)
        os.symlink(deep + "/l3", "l2", dir_fd=fd)
        os.close(os.open("end", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        os.symlink(deep + "/end", "l3", dir_fd=fd)
        os.close(fd)
        self.addCleanup(subprocess.call, ["rm", "-rf", os.path.join(self.home, "a")])
        self.assertTrue(os.path.exists(deep + "/l1"))
        self.assertIsNone(look(deep + "/l1", USER))
