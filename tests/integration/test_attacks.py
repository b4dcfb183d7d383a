"""
The security boundary: whatever a user puts at their own path, the router
only relays to a daemon running as that user.

Each attack points the path at a recording decoy; the tests check the refusal
and that the decoy received not one byte.
"""

import os
import re

from tests.integration.harness import (
    UID_A,
    UID_B,
    IntegrationTestCase,
    b64,
    lineRequest,
    unb64,
)

# A request with a body: whatever a decoy might receive, it would see this.
SECRET_REQUEST = lineRequest(
    "POST", "/v1.43/containers/create", body=b'{"Image": "SECRET-PAYLOAD"}'
)


class SymlinkAttackTests(IntegrationTestCase):
    """
    Symlinks to sockets of other users, of root, and of the router itself.
    """

    def attack(self, uid, router):
        """
        Send L{SECRET_REQUEST} as C{uid}; check it is refused with an error
        naming uid and path; return the message.
        """
        agent = self.harness.startAgent(uid)
        reply = agent.call("raw", path=router.listenPath, data=b64(SECRET_REQUEST))
        self.assertEqual(reply["error"], None, "%r\n%s" % (reply, router.evidence()))
        return self.assertHttpError(unb64(reply["head"]), uid, self.harness.backendPath(uid))

    def assertNamesUid(self, message, uid):
        self.assertTrue(re.search(r"\b%d\b" % (uid,), message), message)

    def test_symlinkToRootSocket(self):
        """
        A path pointing at a root-owned socket (root's dockerd) is refused.
        """
        router = self.harness.startRouter()
        decoy = self.harness.startDecoy(os.path.join(self.harness.tmp, "root-docker.sock"))
        self.harness.symlink(decoy.path, self.harness.backendPath(UID_A), owner=UID_A)
        message = self.attack(UID_A, router)
        self.assertNamesUid(message, 0)
        decoy.settle()
        # Not even connected to (a systemd Accept=yes socket would start a
        # service for each connection).
        self.assertEqual((decoy.count("accepted"), decoy.receivedBytes()), (0, 0))
        router.waitLog(r"rejected uid=%d .*cause=wrong-owner" % (UID_A,))

    def test_symlinkToAnotherUsersSocket(self):
        """
        A path pointing at another user's daemon is refused.
        """
        router = self.harness.startRouter()
        victim = self.harness.startDecoy(self.harness.backendPath(UID_B), uid=UID_B)
        self.harness.symlink(victim.path, self.harness.backendPath(UID_A), owner=UID_A)
        message = self.attack(UID_A, router)
        self.assertNamesUid(message, UID_B)
        victim.settle()
        self.assertEqual((victim.count("accepted"), victim.receivedBytes()), (0, 0))
        router.waitLog(r"rejected uid=%d .*cause=wrong-owner" % (UID_A,))

    def test_symlinkToTheRoutersOwnSocket(self):
        """
        A path pointing back at the router's socket would make the inner hop
        arrive as root; root's backend (a decoy here) must see nothing.
        """
        router = self.harness.startRouter()
        rootBackend = self.harness.startDecoy(self.harness.backendPath(0))
        self.harness.symlink(router.listenPath, self.harness.backendPath(UID_A), owner=UID_A)
        self.attack(UID_A, router)
        rootBackend.settle()
        self.assertEqual(rootBackend.receivedBytes(), 0)
        # The router's socket is root's: refused before any connect (the
        # loop guard's own case is the next test).
        router.waitLog(r"rejected uid=%d .*cause=wrong-owner$" % (UID_A,))

    def test_rootsPathToTheRouterItself(self):
        """
        Root's own path leading back to the router: the socket there is
        root's, and so is the process listening on it, so only the loop
        guard (the daemon reached is the router itself) stands between
        root's client and the router relaying to itself.
        """
        router = self.harness.startRouter()
        self.harness.symlink(router.listenPath, self.harness.backendPath(0), owner=0)
        message = self.attack(0, router)
        self.assertIn("leads back to docker-router itself", message)
        router.waitLog(r"rejected uid=0 .*cause=loop$")

    def test_rootObeysTheSameRule(self):
        """
        uid 0 is routed to its own path, and refused when another uid's daemon
        listens there.
        """
        router = self.harness.startRouter()
        decoy = self.harness.startDecoy(self.harness.backendPath(0), uid=UID_B)
        message = self.attack(0, router)
        self.assertNamesUid(message, UID_B)
        decoy.settle()
        self.assertEqual(decoy.receivedBytes(), 0)

    def test_symlinkSwappedInATightLoop(self):
        """
        500 connections while the symlink flips between the user's own daemon
        and a root decoy: every answer is the user's daemon or a refusal, and
        the decoy receives zero bytes (the check is on the daemon connected,
        not on the path looked at before).
        """
        router = self.harness.startRouter()
        own = os.path.join(self.harness.userDirectory(UID_A), "docker.sock")
        self.harness.startBackend(UID_A, "http", own)
        decoy = self.harness.startDecoy(os.path.join(self.harness.tmp, "root-docker.sock"))
        path = self.harness.backendPath(UID_A)
        flipper = self.harness.startFlipper(UID_A, path, [own, decoy.path])
        agent = self.harness.startAgent(UID_A)
        loop = agent.call(
            "requestLoop", seconds=150, path=router.listenPath, data=b64(SECRET_REQUEST), count=500
        )
        flipper.kill()
        decoy.settle()
        self.assertEqual((decoy.count("accepted"), decoy.receivedBytes()), (0, 0))
        self.assertEqual(loop["errors"], {}, loop)
        ok = loop["statuses"].pop("HTTP/1.1 200 OK", 0)
        refused = sum(loop["statuses"].values())
        self.assertEqual(ok + refused, 500, loop)
        # Both states were met, so the race was really run.
        self.assertGreater(ok, 0, loop)
        self.assertGreater(refused, 0, loop)
        for status, sample in loop["samples"].items():
            if status != "HTTP/1.1 200 OK":
                message = self.assertHttpError(unb64(sample), UID_A, path)
                # The decoy's owner, or (when the link flipped between the
                # router's look and the user's) the sentence that names no one.
                if "does not lead to a Docker daemon socket" not in message:
                    self.assertNamesUid(message, 0)


class ProbingTests(IntegrationTestCase):
    """
    Finding 12.5: the router looks with root's eyes, but a user learns
    through it nothing they could not see for themselves.
    """

    def test_rootOnlyDirectoryAnswersAlike(self):
        """
        Links into a root-only (0700) directory, to a listening root socket,
        to a regular file and to nothing, get byte-identical answers; the
        socket is never connected to; the operator's log keeps the reasons.
        """
        router = self.harness.startRouter()
        secret = os.path.join(self.harness.tmp, "secret")
        os.mkdir(secret, 0o700)
        decoy = self.harness.startDecoy(os.path.join(secret, "docker.sock"))
        with open(os.path.join(secret, "file"), "w") as f:
            f.write("root's\n")
        agent = self.harness.startAgent(UID_A)
        answers = {}
        for name in ("docker.sock", "file", "missing"):
            self.harness.symlink(
                os.path.join(secret, name), self.harness.backendPath(UID_A), owner=UID_A
            )
            reply = agent.call("raw", path=router.listenPath, data=b64(SECRET_REQUEST))
            self.assertEqual(reply["error"], None, reply)
            answers[name] = unb64(reply["head"])
        self.assertEqual(answers["docker.sock"], answers["file"])
        self.assertEqual(answers["docker.sock"], answers["missing"])
        message = self.assertHttpError(answers["missing"], UID_A, self.harness.backendPath(UID_A))
        self.assertNotIn(secret, message)
        decoy.settle()
        self.assertEqual((decoy.count("accepted"), decoy.receivedBytes()), (0, 0))
        for cause in ("wrong-owner", "not-a-socket", "missing"):
            router.waitLog(r"rejected uid=%d .*cause=%s\b" % (UID_A, cause))

    def test_ownDirectoryStaysSpecific(self):
        """
        The same link into the user's own directory says what is there.
        """
        router = self.harness.startRouter()
        own = self.harness.userDirectory(UID_A)
        with open(os.path.join(own, "file"), "w") as f:
            f.write("mine\n")
        os.chown(os.path.join(own, "file"), UID_A, UID_A)
        self.harness.symlink(os.path.join(own, "file"), self.harness.backendPath(UID_A), owner=UID_A)
        message = self.attack(UID_A, router)
        self.assertIn("is not a socket", message)

    attack = SymlinkAttackTests.attack
