"""
C{docker-router doctor}, the real console script run as the test users: one
whose rootless daemon runs (dr-alice), one without a daemon (dr-carol), and
one whose path leads to a socket of root's.
"""

import os
import pwd
import socket
import subprocess
import sys
import unittest

from tests.integration.harness import IntegrationTestCase

SCRIPT = os.path.join(os.path.dirname(sys.executable), "docker-router")


def answers(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
        return True
    except OSError:
        return False


class DoctorTests(IntegrationTestCase):
    def user(self, name):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise unittest.SkipTest(f"test user {name} is missing (.ci/rootless-docker.sh start)")

    def doctor(self, name, *arguments, asRoot=False, environment=None):
        """The script's exit status and output, run as C{name} (or as root, for C{name})."""
        user = self.user(name)
        env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, **(environment or {})}
        if asRoot:
            argv, credentials = [SCRIPT, "doctor", name, *arguments], {}
        else:
            argv = [SCRIPT, "doctor", *arguments]
            credentials = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=60, **credentials)
        self.assertEqual(done.stderr, "" if done.returncode != 2 else done.stderr)
        return done.returncode, (done.stdout + done.stderr).splitlines()

    def test_working(self):
        alice = self.user("dr-alice")
        path = f"/run/user/{alice.pw_uid}/docker.sock"
        if not answers(path):
            raise unittest.SkipTest(f"dr-alice's daemon does not answer at {path} (.ci/rootless-docker.sh start)")
        for asRoot, eyes in ((False, ""), (True, " (pinged as dr-alice)")):
            status, lines = self.doctor("dr-alice", asRoot=asRoot)
            self.assertEqual(status, 0, lines)
            self.assertIn(f"ok    socket {path}: yours, answers _ping{eyes}", lines)
            self.assertEqual(lines[-1], "Docker works for you through docker-router.")
            self.assertEqual([line for line in lines if line.startswith("FAIL")], [])

    def test_noDaemon(self):
        carol = self.user("dr-carol")
        status, lines = self.doctor("dr-carol")
        self.assertEqual(status, 1, lines)
        self.assertIn(f"--    socket /run/user/{carol.pw_uid}/docker.sock: missing", lines)
        [failure] = [line for line in lines if line.startswith("FAIL")]
        self.assertTrue(failure.startswith("FAIL  daemon: no socket of the chain answers; fix: "), failure)
        self.assertIn("dockerd-rootless-setuptool.sh install --force && systemctl --user enable --now docker",
                      failure)
        self.assertEqual(lines[-1], "Docker can't be used yet: run the fixes above.")

    def test_pathLeadsToRootsSocket(self):
        """
        A link in the user's directory to a socket root listens on: doctor
        says it is not theirs, exits 1, and never knocks on it.
        """
        bob = self.user("dr-bob")
        runtime = self.harness.userDirectory(bob.pw_uid)
        decoy = self.harness.startDecoy(os.path.join(self.harness.tmp, "root.sock"))
        link = os.path.join(runtime, "docker.sock")
        self.harness.symlink(decoy.path, link, owner=bob.pw_uid)
        config = os.path.join(self.harness.tmp, "router.toml")
        with open(config, "w") as f:
            f.write(f'user-socket = "{runtime}/docker.sock"\n')
        for asRoot in (False, True):
            status, lines = self.doctor("dr-bob", "--config", config, asRoot=asRoot)
            self.assertEqual(status, 1, lines)
            self.assertIn(
                f"FAIL  socket {link}: belongs to root (uid 0), not to dr-bob: docker-router refuses "
                f"to connect you to it; fix: rm {link} (and point it at your own daemon, or remove the link)",
                lines,
            )
        decoy.settle()
        self.assertEqual(decoy.count("accepted"), 0)

    def test_dockerHostBypassesTheRouter(self):
        status, lines = self.doctor("dr-carol", environment={"DOCKER_HOST": "tcp://127.0.0.1:2375"})
        self.assertIn(
            "warn  DOCKER_HOST: tcp://127.0.0.1:2375 bypasses /var/run/docker.sock; fix: unset "
            "DOCKER_HOST (and remove it from your shell's profile)",
            lines,
        )

    def test_anotherUserIsRootsToCheck(self):
        status, lines = self.doctor("dr-carol", "dr-alice")
        self.assertEqual((status, lines), (2, ["docker-router doctor: only root can check another user"]))

    def config(self, text):
        path = os.path.join(self.harness.tmp, "router.toml")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        return path

    def test_ruleAndOwner(self):
        """
        A user a rule sends elsewhere is shown that rule's chain, judged by
        the owner it names: a socket of the user's own there is refused.
        """
        bob, carol = self.user("dr-bob"), self.user("dr-carol")
        shared = os.path.join(self.harness.tmp, "shared-{user}.sock")
        path = shared.format(user="dr-bob")
        with socket.socket(socket.AF_UNIX) as bound:
            bound.bind(path)
        os.chown(path, bob.pw_uid, bob.pw_gid)
        config = self.config(f'[[rule]]\nuser = "dr-bob"\nuser-socket = "{shared}"\nowner = "dr-carol"\n')
        for asRoot in (False, True):
            status, lines = self.doctor("dr-bob", "--config", config, asRoot=asRoot)
            self.assertEqual(status, 1, lines)
            self.assertIn(
                f"FAIL  socket {path}: belongs to dr-bob (uid {bob.pw_uid}), not to dr-carol "
                f"(uid {carol.pw_uid}): docker-router refuses to connect you to it; fix: rm {path} "
                "(and point it at your own daemon, or remove the link)",
                lines,
            )
            self.assertEqual([line for line in lines if f"/run/user/{bob.pw_uid}/" in line], [])

    def test_ruleDenies(self):
        """A user a rule refuses reads the rule's message, and nothing is tried."""
        config = self.config('[[rule]]\nuser = "dr-carol"\ndeny = "Docker is not for this account"\n')
        for asRoot in (False, True):
            status, lines = self.doctor("dr-carol", "--config", config, asRoot=asRoot)
            self.assertEqual(status, 1, lines)
            self.assertIn("FAIL  route: Docker is not for this account.", lines)
            self.assertEqual([line for line in lines if " socket " in line], [])

    def test_badConfiguration(self):
        """A file the router would refuse is named, not silently replaced by the defaults."""
        config = self.config('[[rule]]\nuser = "dr-carol"\n')
        status, lines = self.doctor("dr-carol", "--config", config)
        self.assertEqual(status, 1, lines)
        [failure] = [line for line in lines if line.startswith("FAIL  configuration: ")]
        self.assertIn("a rule needs either user-socket or deny", failure)
