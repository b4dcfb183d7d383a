"""
The chain of sockets and the rules, through the real router process, with
fake daemons and clients running under other uids.
"""

import json
import os
import signal
import subprocess

from tests.integration.harness import UID_A, UID_B, IntegrationTestCase, unb64

# A test user with an entry in the user database (for {home}), made and
# removed by the test, and groups no account has.
HOME_USER, HOME_UID = "dr-it-home", 61003
GROUP, OTHER_GROUP = 61500, 61501


def message(reply):
    return json.loads(unb64(reply["body"]))["message"]


class ChainTests(IntegrationTestCase):
    def startChain(self, *templates, **kwargs):
        """A router trying C{templates} in order."""
        args = []
        for template in templates[1:]:
            args += ["--user-socket", template]
        return self.harness.startRouter(template=templates[0], args=args + list(kwargs.get("args", ())))

    def test_missingRefusedNotASocketPassOn(self):
        """
        Nothing at the first path, a stale socket at the second, a plain
        file at the third: the daemon at the fourth (a Podman-like path in
        the user's own directory) answers, and the record names its path.
        Once it is gone too, one error lists each path and why.
        """
        backends = self.harness.backends
        podman = os.path.join(self.harness.userDirectory(UID_A), "podman", "podman.sock")
        os.mkdir(os.path.dirname(podman))
        os.chown(os.path.dirname(podman), UID_A, UID_A)
        router = self.startChain(
            os.path.join(backends, "{uid}.sock"),
            os.path.join(backends, "stale-{uid}.sock"),
            os.path.join(backends, "file-{uid}"),
            os.path.join(self.harness.tmp, "home-{uid}", "podman", "podman.sock"),
        )
        stale = self.harness.startBackend(UID_A, "stale", os.path.join(backends, "stale-%d.sock" % (UID_A,))).path
        plain = os.path.join(backends, "file-%d" % (UID_A,))
        with open(plain, "w"):
            pass
        os.chown(plain, UID_A, UID_A)
        daemon = self.harness.startBackend(UID_A, "http", podman)
        agent = self.harness.startAgent(UID_A)
        reply = agent.call("http", path=router.listenPath, method="GET", url="/_ping")
        self.assertServedBy(reply, UID_A, router)
        self.assertEqual(router.connectionDone(agent.ready["pid"])["backend"], podman)

        daemon.kill()  # its socket stays: now a stale one too
        reply = self.get(UID_A, router=router)
        self.assertEqual(reply["status"], 503, reply)
        self.assertEqual(
            message(reply).split("; start ")[0],
            "No Docker daemon is running for user %d (uid %d): tried %s/%d.sock: nothing there; "
            "%s: refuses connections (a stale socket); %s: not a socket; "
            "%s: refuses connections (a stale socket)" % (UID_A, UID_A, backends, UID_A, stale, plain, podman),
        )
        router.waitLog(r"rejected uid=%d .* cause=missing" % (UID_A,))

    def test_wrongOwnerDoesNotFallThrough(self):
        """
        A daemon of another uid at the first path is refused at once: the
        client's own daemon at the second path is never connected.
        """
        second = os.path.join(self.harness.userDirectory(UID_A), "second.sock")
        router = self.startChain(
            os.path.join(self.harness.backends, "{uid}.sock"),
            os.path.join(self.harness.tmp, "home-{uid}", "second.sock"),
        )
        decoy = self.harness.startDecoy(self.harness.backendPath(UID_A), uid=UID_B)
        own = self.harness.startDecoy(second, uid=UID_A)
        reply = self.get(UID_A, router=router)
        self.assertEqual(reply["status"], 403, reply)
        self.assertIn("belongs to uid %d" % (UID_B,), message(reply))
        router.waitLog(r"rejected uid=%d .* cause=wrong-owner" % (UID_A,))
        self.assertEqual((own.count("accepted"), decoy.count("accepted")), (0, 0))

    def test_homeFromTheUserDatabase(self):
        """
        The default chain for a real account: nothing under its (missing)
        runtime directory, so the daemon in {home}/.docker/run answers;
        once a daemon listens at Podman's path, that one comes first.
        """
        home = os.path.join(self.harness.tmp, "home")
        self.addUser(HOME_USER, HOME_UID, home)
        run = os.path.join(home, ".docker", "run")
        os.makedirs(run)
        for path in (home, os.path.dirname(run), run):
            os.chown(path, HOME_UID, HOME_UID)
        os.chmod(home, 0o700)
        router = self.startChain(
            "/run/user/{uid}/docker.sock", "/run/user/{uid}/podman/podman.sock", "{home}/.docker/run/docker.sock"
        )
        self.harness.startBackend(HOME_UID, "http", os.path.join(run, "docker.sock"))
        agent = self.harness.startAgent(HOME_UID)
        self.assertServedBy(agent.call("http", path=router.listenPath, method="GET", url="/_ping"), HOME_UID, router)
        done = router.connectionDone(agent.ready["pid"])
        self.assertEqual((done["user"], done["backend"]), (HOME_USER, os.path.join(run, "docker.sock")))

        runtime = "/run/user/%d" % (HOME_UID,)
        os.makedirs(runtime + "/podman")
        self.addCleanup(subprocess.run, ["rm", "-rf", runtime])
        for path in (runtime, runtime + "/podman"):
            os.chown(path, HOME_UID, HOME_UID)
            os.chmod(path, 0o700)
        self.harness.startBackend(HOME_UID, "http", runtime + "/podman/podman.sock", tag="podman")
        agent = self.harness.startAgent(HOME_UID)
        reply = agent.call("http", path=router.listenPath, method="GET", url="/_ping")
        self.assertEqual(json.loads(unb64(reply["body"]))["tag"], "podman", reply)
        self.assertEqual(router.connectionDone(agent.ready["pid"])["backend"], runtime + "/podman/podman.sock")

    def addUser(self, name, uid, home):
        """A real account (for the user database's {home}), removed at cleanup."""
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(
            ["useradd", "--uid", str(uid), "--home-dir", home, "--no-create-home", "--user-group",
             "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        self.addCleanup(subprocess.run, ["userdel", name], capture_output=True)


class RuleTests(IntegrationTestCase):
    def writeConfig(self, text):
        path = os.path.join(self.harness.tmp, "docker-router.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_groupRuleToARootDaemon(self):
        """
        A client in the rule's group (supplementary, or as its primary
        group) reaches the root-owned daemon the rule names; one outside it
        goes to its own.  A group sent to a socket whose daemon is not the
        owner the rule names is refused, and never falls through.
        """
        system = os.path.join(self.harness.tmp, "system.sock")
        wrong = os.path.join(self.harness.backends, "wrong.sock")
        config = self.writeConfig(
            '[[rule]]\ngroup = %d\nuser-socket = ["%s"]\nowner = "root"\n\n'
            '[[rule]]\ngroup = [%d]\nuser-socket = ["%s"]\nowner = 0\n' % (GROUP, system, OTHER_GROUP, wrong)
        )
        router = self.harness.startRouter(args=["--config", config])
        self.harness.startBackend(0, "http", system)
        self.harness.startBackend(UID_A, "http")
        decoy = self.harness.startDecoy(wrong, uid=UID_B)
        inGroup = self.harness.startAgent(UID_A, groups=[GROUP])
        self.assertServedBy(inGroup.call("http", path=router.listenPath, method="GET", url="/_ping"), 0, router)
        self.assertEqual(router.connectionDone(inGroup.ready["pid"])["backend"], system)
        primary = self.harness.startAgent(UID_B, gid=GROUP)
        self.assertServedBy(primary.call("http", path=router.listenPath, method="GET", url="/_ping"), 0, router)
        self.assertServedBy(self.get(UID_A, router=router), UID_A, router)
        refused = self.harness.startAgent(UID_A, groups=[OTHER_GROUP])
        reply = refused.call("http", path=router.listenPath, method="GET", url="/_ping")
        self.assertEqual(reply["status"], 403, reply)
        self.assertIn("belongs to uid %d, not to uid 0" % (UID_B,), message(reply))
        self.assertEqual(decoy.count("accepted"), 0)

    def test_denyAndReload(self):
        """
        A deny rule added to the file applies after SIGHUP: the client reads
        the site's message as it is, and nothing is connected.
        """
        config = self.writeConfig("")
        router = self.harness.startRouter(args=["--config", config])
        self.harness.startBackend(UID_A, "http")
        self.assertServedBy(self.get(UID_A, router=router), UID_A, router)
        router.waitLog(r"connection done: uid=%d " % (UID_A,))
        self.writeConfig('[[rule]]\nuid = %d\ndeny = "Docker is off for you; see https://wiki.example/docker"\n' % (UID_A,))
        os.kill(router.pid, signal.SIGHUP)
        router.waitLog(r"reloaded on SIGHUP: .* applied to new connections")
        reply = self.get(UID_A, router=router)
        self.assertEqual(reply["status"], 403, reply)
        self.assertEqual(message(reply), "Docker is off for you; see https://wiki.example/docker.")
        router.waitLog(r"rejected uid=%d .* cause=denied" % (UID_A,))
        self.assertEqual(len(router.logMatches(r"connection done: uid=%d " % (UID_A,))), 1)
