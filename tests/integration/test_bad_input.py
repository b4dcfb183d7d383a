"""
Issue 5, bad input: whatever a client sends, and wherever it gives up, the
router neither crashes nor leaks descriptors nor disturbs anyone else.

Hypothesis makes up the clients (garbage, a request cut anywhere, silence,
a reset at any point) and an agent of another uid plays them against the
real router process, once with no backend (the error responder answers) and
once with a live echo daemon (the bytes are relayed).  Throughout, a second
user's long-lived relay keeps checking its own round trips.
"""

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.harness import (
    UID_A,
    UID_B,
    IntegrationTestCase,
    b64,
    lineRequest,
    pollUntil,
    unb64,
)

VALID = [
    lineRequest(),
    lineRequest("POST", "/v1.43/containers/create", body=b'{"Image": "busybox"}'),
    lineRequest("GET", "/v1.43/containers/json?all=1", extra=b"Connection: Upgrade\r\nUpgrade: tcp\r\n"),
    b"HEAD /_ping HTTP/1.0\r\n\r\n",
]

# Past the responder's request-line limit (ErrorResponder.maxLineBytes), to
# take that path too.
BIG = 80 * 1024


@st.composite
def payloads(draw):
    """
    The bytes a client sends: garbage, a valid request cut anywhere, a valid
    request followed by garbage, or a big blob with no end of head.
    """
    kind = draw(st.sampled_from(["garbage", "cut", "trailing", "big"]))
    if kind == "garbage":
        return draw(st.binary(max_size=2048))
    request = draw(st.sampled_from(VALID))
    if kind == "cut":
        return request[: draw(st.integers(0, len(request)))]
    if kind == "trailing":
        return request + draw(st.binary(max_size=512))
    return draw(st.binary(min_size=1, max_size=64)) * (BIG // 64 + 1)


@st.composite
def scenarios(draw):
    """
    A client as steps: its bytes in pieces, then how it ends.
    """
    data = draw(payloads())
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if b > a]
    ending = draw(
        st.sampled_from(["complete", "readSome", "close", "reset", "silentHold", "hold"])
    )
    if ending == "silentHold":
        # Connects and never sends a byte.
        pieces = []
    steps = [{"do": "send", "data": b64(p)} for p in pieces]
    if ending == "complete":
        steps += [{"do": "shutdown"}, {"do": "read"}, {"do": "close"}]
    elif ending == "readSome":
        n = draw(st.integers(1, 100))
        steps += [{"do": "shutdown"}, {"do": "readSome", "max": n}, {"do": "close"}]
    elif ending in ("close", "reset"):
        steps.append({"do": ending})
    else:
        steps.append({"do": "hold"})
    return data, ending, steps


ANSWER = re.compile(rb"\AHTTP/1\.[01] 5\d\d [^\r\n]*\r\n")


class BadInputTests(IntegrationTestCase):
    def setUp(self):
        IntegrationTestCase.setUp(self)
        self.router = self.harness.startRouter()
        self.harness.startBackend(UID_B, "echo")
        self.bystander = self.harness.startEchoLoop(UID_B, self.router.listenPath)

    def descriptors(self):
        return self.router.descriptors()

    def play(self, relayed):
        """
        Run the made-up clients as UID_A and check each one, then that the
        router is back where it started.
        """
        router = self.router
        # Let the bystander's relay run a little first, so its pipes are in
        # the baseline.
        self.bystander.waitEvent("progress", 10)
        before = self.descriptors()
        agent = self.harness.startAgent(UID_A)
        played = {"complete": 0}

        @settings(
            max_examples=70,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(scenarios())
        def client(scenario):
            data, ending, steps = scenario
            outcome = agent.call("scenario", seconds=60, path=router.listenPath, steps=steps)
            self.assertIsNone(router.process.poll(), router.evidence())
            self.assertEqual(self.bystander.count("failed"), 0, self.bystander.events[-2:])
            if ending != "complete":
                return
            played["complete"] += 1
            answer = unb64(outcome["read"])
            self.assertEqual(outcome["errors"], [], outcome)
            self.assertTrue(outcome["eof"], outcome)
            if relayed:
                self.assertEqual(answer, data, "relay changed the bytes")
            else:
                self.assertRegex(answer, ANSWER)

        client()
        self.assertGreater(played["complete"], 0)
        okBefore = self.bystander.last("progress", "ok", 0)
        agent.call("closeHeld")

        # Back to the baseline: every socket of the clients closed.  Idle
        # pipes the pool keeps are not a leak, but at most two relays were
        # ever busy at once (two pipes each); nor is the socket file the
        # router keeps open for the one backend path these clients used.
        def settled():
            now = self.descriptors()
            pipes = now.pop("pipe", 0)
            files = now.pop("file", 0)
            others = dict(before)
            if pipes > others.pop("pipe", 0) + 8:
                return False
            if files > others.pop("file", 0) + (1 if relayed else 0):
                return False
            return now == others

        try:
            pollUntil(settled, 20, interval=0.1, what="the router's descriptors to settle")
        except AssertionError:
            self.fail(
                "descriptors before %r, now %r\n%s"
                % (before, self.descriptors(), router.evidence())
            )
        # The bystander kept going throughout and still does.
        later = self.bystander.waitEvent("progress", 10, len(self.bystander.events))[1]
        self.assertGreater(later["ok"], okBefore)
        self.assertEqual(self.bystander.count("failed"), 0, self.bystander.events[-2:])
        self.assertIsNone(router.process.poll())
        log = router.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)

    def test_errorResponderPath(self):
        """
        UID_A has no daemon: the error responder meets every bad client.
        """
        self.play(relayed=False)

    def test_relayPath(self):
        """
        UID_A has an echo daemon: the relay meets every bad client, and a
        client that finishes cleanly gets its bytes back unchanged.
        """
        self.harness.startBackend(UID_A, "echo")
        self.play(relayed=True)
