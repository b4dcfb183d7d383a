"""
When the backend cannot be used, a real HTTP client reads a Docker-shaped
error in full, and the connection ends cleanly (never a reset).
"""

import json
import os
import shutil
import unittest

from tests.integration.harness import (
    NOBODY,
    UID_A,
    UID_B,
    IntegrationTestCase,
    b64,
    lineRequest,
    parseResponse,
    unb64,
)

# Bigger than a request head, smaller than the socket buffers: a client can
# send it all without the router reading it, which is what makes an unread
# body turn into a reset if the router closes carelessly.
POST_BODY = json.dumps({"Image": "alpine", "Env": ["X=" + "x" * 65536]}).encode()


class ErrorResponseTests(IntegrationTestCase):
    """
    One test per cause of point 4 of the issue, each checked with GET, POST
    with a body, and HEAD.
    """

    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.router = self.harness.startRouter(["--connect-timeout", "1"])

    def assertAllRequestsGetTheError(self, uid, cause, user=None, router=None):
        """
        GET and POST through http.client, HEAD raw: each gets the error; the
        log has the rejection with C{cause}.  Return the GET's message.
        """
        router = router or self.router
        path = self.harness.backendPath(uid)
        agent = self.harness.startAgent(uid)
        replies = {
            "GET": agent.call("http", path=router.listenPath, method="GET", url="/v1.43/version"),
            "POST": agent.call(
                "http",
                path=router.listenPath,
                method="POST",
                url="/v1.43/containers/create",
                body=b64(POST_BODY),
                headers={"Content-Type": "application/json"},
            ),
        }
        messages = {}
        for method, reply in replies.items():
            try:
                messages[method] = self.assertCleanHttpError(reply, uid, path, user)
            except AssertionError as e:
                raise AssertionError("%s: %s\n%s" % (method, e, router.evidence()))
        self.assertEqual(messages["GET"], messages["POST"])

        head = agent.call("raw", path=router.listenPath, data=b64(lineRequest("HEAD", "/_ping")))
        self.assertEqual(head["error"], None, "HEAD: %r\n%s" % (head, router.evidence()))
        status, headers, body = parseResponse(unb64(head["head"]))
        self.assertGreaterEqual(status, 400)
        self.assertEqual(headers.get("connection", "").lower(), "close")
        self.assertEqual(body, b"", "HEAD answered with a body")

        router.waitLog(r"rejected uid=%d .*cause=%s$" % (uid, cause))
        return messages["GET"]

    def test_missing(self):
        """
        Nothing at the path: say how to start a rootless daemon.
        """
        message = self.assertAllRequestsGetTheError(UID_A, "missing")
        for advice in ("systemctl --user start docker", "--force", "enable-linger"):
            self.assertIn(advice, message)

    def test_missingNamedUser(self):
        """
        A user with a name is named in the message.
        """
        self.assertAllRequestsGetTheError(NOBODY, "missing", user="nobody")

    def test_dockerSdkRaisesApiErrorWithTheMessage(self):
        """
        The Docker SDK raises C{APIError} carrying the router's message.
        """
        agent = self.harness.startAgent(UID_A)
        result = agent.call("dockerPing", path=self.router.listenPath)
        self.assertTrue(result["apiError"], result)
        self.assertGreaterEqual(result["status"], 400)
        self.assertIn(self.harness.backendPath(UID_A), result["explanation"])

    def test_refused(self):
        """
        A stale socket file nobody listens on (bound, then closed).
        """
        self.harness.startBackend(UID_A, "stale")
        self.assertTrue(os.path.exists(self.harness.backendPath(UID_A)))
        self.assertAllRequestsGetTheError(UID_A, "refused")

    def test_notASocket(self):
        path = self.harness.backendPath(UID_A)
        with open(path, "w") as f:
            f.write("not a socket\n")
        os.chown(path, UID_A, UID_A)
        self.assertAllRequestsGetTheError(UID_A, "not-a-socket")

    def test_danglingLink(self):
        """
        Issue 9.4: a link into the user's own directory, to nothing, says it
        is a link and names its target.
        """
        target = os.path.join(self.harness.userDirectory(UID_A), "docker.sock")
        self.harness.symlink(target, self.harness.backendPath(UID_A), owner=UID_A)
        message = self.assertAllRequestsGetTheError(UID_A, "missing")
        self.assertIn("is a symbolic link to %s, which does not exist" % (target,), message)

    def test_noRuntimeDirectory(self):
        """
        Issue 9.4: no /run/user/<uid> at all: the user is not logged in and
        has no linger.
        """
        self.assertFalse(os.path.exists("/run/user/%d" % (UID_A,)))
        router = self.harness.startRouter(
            ["--user-socket", "/run/user/{uid}/docker.sock"],
            listenPath=os.path.join(self.harness.tmp, "runtime.sock"),
        )
        agent = self.harness.startAgent(UID_A)
        reply = agent.call("http", path=router.listenPath, method="GET", url="/_ping")
        message = self.assertCleanHttpError(reply, UID_A, "/run/user/%d/docker.sock" % (UID_A,))
        for part in ("no runtime directory /run/user/%d" % (UID_A,), "not logged in", "enable-linger"):
            self.assertIn(part, message)

    def test_siteAdvice(self):
        """
        Issue 8.7: --advice extends the router's advice with the site's.
        """
        router = self.harness.startRouter(
            ["--advice", "{advice}; see https://wiki.example/docker"],
            listenPath=os.path.join(self.harness.tmp, "advice.sock"),
        )
        message = self.assertAllRequestsGetTheError(UID_A, "missing", router=router)
        self.assertIn("systemctl --user start docker", message)
        self.assertTrue(message.endswith("see https://wiki.example/docker."), message)

    def test_wrongOwner(self):
        """
        Another user's daemon listens at this user's path: the message says
        which uid.
        """
        self.harness.startBackend(UID_B, "http", self.harness.backendPath(UID_A))
        message = self.assertAllRequestsGetTheError(UID_A, "wrong-owner")
        self.assertIn(str(UID_B), message)

    def test_connectTimeout(self):
        """
        A daemon whose listen backlog is full never completes the connect:
        after --connect-timeout (1s) the client gets the error.
        """
        backend = self.harness.startBackend(UID_A, "backlogFull")
        self.assertGreater(backend.ready["held"], 0)
        agent = self.harness.startAgent(UID_A)
        reply = agent.call("http", path=self.router.listenPath, method="GET", url="/_ping")
        self.assertCleanHttpError(reply, UID_A, self.harness.backendPath(UID_A))
        self.assertLess(reply["elapsed"], 4, reply)
        self.router.waitLog(r"rejected uid=%d .*cause=timeout$" % (UID_A,))

    def test_permissionDenied(self):
        """
        A socket the router may not connect to (mode 000, with the router
        running without CAP_DAC_OVERRIDE, as under a hardened systemd unit).
        """
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise unittest.SkipTest("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
        router = self.harness.startRouter(
            listenPath=os.path.join(self.harness.tmp, "nodac.sock"),
            wrapper=[
                setpriv,
                "--inh-caps=-all",
                "--bounding-set=-dac_override,-dac_read_search",
                "--",
            ],
        )
        self.harness.startBackend(UID_A, "http", chmod=0)
        self.assertAllRequestsGetTheError(UID_A, "permission", router=router)
