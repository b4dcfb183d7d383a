"""
The relay over real Unix sockets in this process: half-close each way and
backpressure, which in-memory transports can't show.
"""

import errno
import gc
import hashlib
import os
import socket
import weakref

from typing import Optional

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from dockerrouter.routing.resolver import BackendResolver
from dockerrouter.relay.budget import SWEEP_INTERVAL, Budget
from dockerrouter.relay.settings import Settings
from dockerrouter.relay.factory import RouterFactory
from dockerrouter.relay.splice import GRANT, SMALL, SMALL_SNDBUF, PipePool, Splicer, queued


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """Collects what it receives and notes each end it sees."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.readEnded: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    readDone = writeDone = False

    def readConnectionLost(self) -> None:
        self.readDone = True
        self.readEnded.callback(bytes(self.received))
        self._closeWhenDone()

    def writeConnectionLost(self) -> None:
        self.writeDone = True
        self._closeWhenDone()

    def _closeWhenDone(self) -> None:
        if self.readDone and self.writeDone:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class AnswerAfterEOF(Peer):
    """A daemon that reads its stdin to the end, then answers at length."""

    answer = b"".join(b"%08d\n" % i for i in range(100_000))

    def readConnectionLost(self) -> None:
        self.readDone = True
        self.readEnded.callback(bytes(self.received))
        self.transport.write(b"%d\n" % len(self.received) + self.answer)
        self.transport.loseConnection()


class ShortAnswer(AnswerAfterEOF):
    answer = b"ok\n"


@implementer(IPushProducer)
class Firehose(Peer):
    """A daemon that writes C{total} bytes as fast as its transport lets it."""

    total = 32 * 1024 * 1024
    chunk = os.urandom(64 * 1024)

    def connectionMade(self) -> None:
        self.sent = 0
        self.paused = 0
        self.digest = hashlib.sha256()
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused += 1
        self._producing = False

    def resumeProducing(self) -> None:
        self._producing = True
        while self._producing and self.sent < self.total:
            self.transport.write(self.chunk)
            self.digest.update(self.chunk)
            self.sent += len(self.chunk)
        if self.sent >= self.total:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self._producing = False


class Burst(Peer):
    """A daemon that writes C{size} bytes at once, then waits."""

    size = 512 * 1024

    def connectionMade(self) -> None:
        self.transport.write(b"b" * self.size)


def splicing(router: RouterFactory) -> bool:
    """
    Whether the router's relay has its splicer: a relay is counted from
    the client's connect, and splices only once its daemon is verified
    (which a slow machine shows, such as QEMU's TCG in tests/kernel).
    """
    return any(relay._splicer is not None for relay in router.relays)


def pollUntil(condition, timeout: float = 10.0) -> defer.Deferred:
    """Fire once C{condition()} is true; fail after C{timeout} seconds."""

    async def poll() -> None:
        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out waiting for {condition}")
            await task.deferLater(reactor, 0.01)

    return defer.ensureDeferred(poll())


class RealSocketTests(TestCase):
    timeout = 15

    def startRouter(self, backendProtocol: type, budget: Optional[Budget] = None) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.backends: list[Peer] = []

        def buildBackend() -> Peer:
            backend = backendProtocol()
            self.backends.append(backend)
            return backend

        backendFactory: Factory = Factory.forProtocol(buildBackend)
        backendFactory.noisy = False
        backendPort = IReactorUNIX(reactor).listenUNIX(f"{directory}/{os.getuid()}.sock", backendFactory)
        self.addCleanup(backendPort.stopListening)
        self.router = RouterFactory(
            reactor, Settings(BackendResolver(directory + "/{uid}.sock"), 5), budget=budget
        )
        # Backend and router share this process; only the uid is checked here.
        self.router.routerPid = lambda: -1
        self.routerPath = f"{directory}/router.sock"
        routerPort = IReactorUNIX(reactor).listenUNIX(self.routerPath, self.router)
        self.addCleanup(routerPort.stopListening)

    async def connectClient(self) -> Peer:
        client = Peer()
        await UNIXClientEndpoint(reactor, self.routerPath).connect(
            Factory.forProtocol(lambda: client)
        )
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    @defer.inlineCallbacks
    def test_clientHalfClose(self):
        """
        The client's end of stdin reaches the daemon as EOF, and the daemon's
        answer still comes back whole.
        """
        self.startRouter(AnswerAfterEOF)
        client = yield defer.ensureDeferred(self.connectClient())
        client.transport.write(b"abc\n")
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertEqual(bytes(client.received), b"4\n" + AnswerAfterEOF.answer)

    @defer.inlineCallbacks
    def test_anEndedRelayIsFreedAtOnce(self):
        """
        An ended relay is left in no reference cycle: reference counting
        frees it, and the cyclic garbage collector has no work per
        connection.
        """
        gc.disable()
        self.addCleanup(gc.enable)
        self.startRouter(ShortAnswer)
        client = yield defer.ensureDeferred(self.connectClient())
        yield pollUntil(lambda: splicing(self.router))
        [relay] = self.router.relays
        refs = [weakref.ref(relay), weakref.ref(relay._splicer)]
        del relay
        client.transport.write(b"abc\n")
        client.transport.loseWriteConnection()
        yield client.lost
        yield pollUntil(lambda: not self.router.relays)
        self.assertEqual([ref() for ref in refs], [None, None])

    @defer.inlineCallbacks
    def test_daemonHalfClose(self):
        """
        The daemon's EOF reaches the client, which can still send.
        """
        self.startRouter(Peer)
        client = yield defer.ensureDeferred(self.connectClient())
        yield pollUntil(lambda: self.backends)
        [backend] = self.backends
        backend.transport.write(b"hello")
        backend.transport.loseWriteConnection()
        self.assertEqual((yield client.readEnded), b"hello")
        client.transport.write(b"still talking")
        client.transport.loseWriteConnection()
        self.assertEqual((yield backend.readEnded), b"still talking")
        yield client.lost
        yield pollUntil(lambda: not self.router.relays)

    @defer.inlineCallbacks
    def test_slowReaderPausesTheDaemon(self):
        """
        A client that stops reading stalls the daemon in the kernel instead of
        letting the router buffer the stream; every byte arrives once it reads.
        """
        self.startRouter(Firehose)
        client = yield defer.ensureDeferred(self.connectClient())
        client.transport.pauseProducing()
        yield pollUntil(lambda: splicing(self.router) and self.backends and self.backends[0].paused)
        [backend] = self.backends
        [relay] = self.router.relays
        down = relay._splicer._down
        # The router's side towards the client filled: it holds one pipe's
        # worth at most and stops reading the daemon.
        yield pollUntil(lambda: down.pending > 0 and down.source not in reactor.getReaders())
        self.assertLessEqual(down.pending, 1024 * 1024)
        # The router reads nothing more from the daemon (what the daemon's
        # own socket still takes meanwhile is the kernel's buffer filling,
        # which a slow machine such as QEMU's TCG shows late), and the
        # daemon is held back: it has not sent everything.
        count = down.count
        yield task.deferLater(reactor, 0.2)
        self.assertEqual(down.count, count)
        self.assertNotIn(down.source, reactor.getReaders())
        self.assertLess(backend.sent, Firehose.total)
        client.transport.resumeProducing()
        yield client.readEnded
        self.assertEqual(len(client.received), Firehose.total)
        self.assertEqual(hashlib.sha256(client.received).hexdigest(), backend.digest.hexdigest())

    @defer.inlineCallbacks
    def test_recordCountsEveryByte(self):
        """
        The connection's record carries the bytes each way, and an idle relay
        holds no pipe.
        """
        self.startRouter(AnswerAfterEOF)
        with capturedLogs() as events:
            client = yield defer.ensureDeferred(self.connectClient())
            client.transport.write(b"x" * 300_000)
            yield pollUntil(lambda: self.backends and len(self.backends[0].received) == 300_000)
            [relay] = self.router.relays
            self.assertIsNone(relay._splicer._up.pipe)
            self.assertIsNone(relay._splicer._down.pipe)
            client.transport.loseWriteConnection()
            yield client.lost
            yield pollUntil(lambda: not self.router.relays)
            self.router.records.flush()
        [record] = [e for e in events if "bytesToDocker" in e]
        self.assertEqual(
            (record["bytesToDocker"], record["bytesFromDocker"], record["end"]),
            (300_000, len(b"300000\n" + AnswerAfterEOF.answer), "closed"),
        )

    @defer.inlineCallbacks
    def test_daemonDiesMidStream(self):
        """
        A daemon that dies with bytes still owed to it ends the client's
        connection promptly, and the record says which side failed.
        """
        self.startRouter(Peer)
        with capturedLogs() as events:
            client = yield defer.ensureDeferred(self.connectClient())
            yield pollUntil(lambda: splicing(self.router) and self.backends)
            [backend] = self.backends
            [relay] = self.router.relays
            backend.transport.pauseProducing()
            client.transport.write(b"x" * 4 * 1024 * 1024)
            yield pollUntil(lambda: relay._splicer._up.pending > 0)
            backend.transport.abortConnection()
            yield client.lost
            yield pollUntil(lambda: not self.router.relays)
            self.router.records.flush()
        [record] = [e for e in events if "bytesToDocker" in e]
        self.assertTrue(record["end"].startswith("docker:"), record["end"])


def sndbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def stalled(relay) -> bool:
    """The daemon-to-client direction has stopped reading: its sink is full."""
    if relay._splicer is None:
        return False
    down = relay._splicer._down
    return down.source not in reactor.getReaders() and down.sink in reactor.getWriters()


class BudgetTests(RealSocketTests):
    """
    What a stalled direction may hold: little without a grant of the budget,
    a bulk transfer's worth with one, and the grant only while it is needed.
    The budget sweeps on a Clock of its own, so each sweep is a step here.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()

    @defer.inlineCallbacks
    def test_stalledWithoutGrantHoldsLittle(self):
        """
        A user with no share left: their stalled download holds one small
        read in the pipe and a small send buffer's worth in the client's
        socket, the rest stays with the daemon, and every byte still arrives
        once the client reads.
        """
        self.startRouter(Firehose, Budget(self.clock, perUser=GRANT - 1))
        client = yield defer.ensureDeferred(self.connectClient())
        client.transport.pauseProducing()
        yield pollUntil(lambda: self.router.relays and stalled(next(iter(self.router.relays))))
        [relay] = self.router.relays
        down = relay._splicer._down
        self.assertFalse(down.big)
        # Stalled, it holds no pipe: its last small read went into the
        # client's socket whole, beside the first one that the default send
        # buffer took (the kernel's count has some overhead on top): what
        # the pipe and the socket held before.
        self.assertIsNone(down.pipe)
        self.assertLessEqual(queued(relay._splicer._client.sock), 2 * SMALL + 2 * SMALL_SNDBUF)
        self.assertEqual(self.router.budget.used, 0)
        client.transport.resumeProducing()
        yield client.readEnded
        self.assertEqual(hashlib.sha256(client.received).hexdigest(), self.backends[0].digest.hexdigest())

    @defer.inlineCallbacks
    def test_smallSendBufferFromTheSecondRead(self):
        """
        A direction's sink keeps its default send buffer through the first
        read (one small read at most, so a short exchange costs no
        C{setsockopt}) and has the small one from the second read on.
        """
        self.startRouter(Peer)
        client = yield defer.ensureDeferred(self.connectClient())
        yield pollUntil(lambda: splicing(self.router))
        [relay] = self.router.relays
        daemonSide = relay._splicer._daemon.sock
        default = sndbuf(daemonSide)
        self.assertNotEqual(default, 2 * SMALL_SNDBUF)
        client.transport.write(b"a")
        yield pollUntil(lambda: self.backends and self.backends[0].received == b"a")
        self.assertEqual(sndbuf(daemonSide), default)
        client.transport.write(b"b")
        yield pollUntil(lambda: self.backends[0].received == b"ab")
        self.assertEqual(sndbuf(daemonSide), 2 * SMALL_SNDBUF)
        self.backends[0].transport.loseConnection()
        client.transport.loseWriteConnection()
        yield pollUntil(lambda: not self.router.relays)

    @defer.inlineCallbacks
    def test_grantsStopAtTheUsersShare(self):
        """
        Three stalled downloads of one user with room for two grants: two
        go big, the third stays small, and the user holds two grants.
        """
        self.startRouter(Firehose, Budget(self.clock, perUser=2 * GRANT))
        clients = []
        for _ in range(3):
            client = yield defer.ensureDeferred(self.connectClient())
            client.transport.pauseProducing()
            clients.append(client)
        yield pollUntil(lambda: len(self.router.relays) == 3 and all(map(stalled, self.router.relays)))
        downs = [relay._splicer._down for relay in self.router.relays]
        self.assertEqual(sorted(d.big for d in downs), [False, True, True])
        [small] = [d for d in downs if not d.big]
        self.assertIsNone(small.pipe)
        self.assertEqual(self.router.budget.heldBy(os.getuid()), 2 * GRANT)

    @defer.inlineCallbacks
    def test_grantHeldUntilThePeerHasRead(self):
        """
        A burst that the router has passed on whole but the client has not
        read still sits in the grown buffer: the grant is kept through any
        number of sweeps, and given back (the buffer small again) at the
        first sweep after the client has read it all.
        """
        self.startRouter(Burst, Budget(self.clock))
        client = yield defer.ensureDeferred(self.connectClient())
        client.transport.pauseProducing()
        yield pollUntil(
            lambda: splicing(self.router)
            and next(iter(self.router.relays))._splicer._down.count == Burst.size
        )
        [relay] = self.router.relays
        down = relay._splicer._down
        clientSide = relay._splicer._client.sock
        yield pollUntil(lambda: not down.pending)
        self.assertTrue(down.big)
        for _ in range(3):
            self.clock.advance(SWEEP_INTERVAL)
        self.assertTrue(down.big)
        self.assertEqual(self.router.budget.used, GRANT)
        self.assertGreater(queued(clientSide), SMALL + 2 * SMALL_SNDBUF)
        client.transport.resumeProducing()
        yield pollUntil(lambda: len(client.received) == Burst.size)
        self.clock.advance(SWEEP_INTERVAL)
        self.assertEqual((down.big, self.router.budget.used), (False, 0))
        self.assertEqual(sndbuf(clientSide), 2 * SMALL_SNDBUF)
        # Still relaying, small.
        self.backends[0].transport.write(b"more")
        yield pollUntil(lambda: len(client.received) == Burst.size + 4)
        self.backends[0].transport.loseConnection()
        client.transport.loseWriteConnection()
        yield pollUntil(lambda: not self.router.relays)

    @defer.inlineCallbacks
    def test_relayEndGivesGrantBack(self):
        """
        A finished bulk transfer gives its grant back with its relay.
        """
        self.startRouter(Firehose, Budget(self.clock))
        client = yield defer.ensureDeferred(self.connectClient())
        yield pollUntil(lambda: self.router.budget.used)
        yield client.readEnded
        client.transport.loseWriteConnection()
        yield pollUntil(lambda: not self.router.relays)
        self.assertEqual(self.router.budget.used, 0)

    @defer.inlineCallbacks
    def test_endedRelayKeepsGrantUntilThePeerHasRead(self):
        """
        A relay that ends while its client has yet to read a burst keeps the
        grant, and the socket that holds the burst, until the client has
        read it: closing it earlier would leave the bytes pinned in the
        client's queue and no longer counted.
        """
        self.startRouter(Burst, Budget(self.clock))
        client = yield defer.ensureDeferred(self.connectClient())
        client.transport.pauseProducing()
        yield pollUntil(lambda: splicing(self.router))
        [relay] = self.router.relays
        clientEnd = relay._splicer._client
        clientSide = clientEnd.sock
        yield pollUntil(lambda: relay._splicer._down.count == Burst.size)
        self.backends[0].transport.loseConnection()
        client.transport.loseWriteConnection()
        yield pollUntil(lambda: not self.router.relays)
        self.clock.advance(SWEEP_INTERVAL)
        self.assertEqual(self.router.budget.used, GRANT)
        self.assertNotEqual(clientSide.fileno(), -1)
        client.transport.resumeProducing()
        self.assertEqual(len((yield client.readEnded)), Burst.size)
        self.clock.advance(SWEEP_INTERVAL)
        self.clock.advance(SWEEP_INTERVAL)
        self.assertEqual((self.router.budget.used, clientSide.fileno()), (0, -1))
        # With its last kept socket closed, the relay is cut loose too.
        self.assertFalse(clientEnd.splicer._running)
        self.assertIsNot(clientEnd.splicer, relay._splicer)


def openDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class SplicerTests(TestCase):
    """
    One L{Splicer} over two socketpairs: this test holds the client's and
    the daemon's far ends, and does to them what a client or a daemon may.
    """

    timeout = 30

    def startSplicer(self, pool: Optional[PipePool] = None) -> None:
        self.pool = pool if pool is not None else PipePool(8)
        self.client, clientSide = socket.socketpair()
        self.daemon, daemonSide = socket.socketpair()
        for sock in (self.client, self.daemon, clientSide, daemonSide):
            sock.setblocking(False)
        self.endedAs: defer.Deferred = defer.Deferred()

        def ended(why: Optional[str]) -> None:
            # As the relay's protocol does.
            self.splicer.close()
            self.endedAs.callback(why)

        # Sweeping for real: an ended relay keeps the client's socket, and its
        # grant, until the client has read what the grown buffer holds.
        budget = Budget(reactor)
        self.addCleanup(budget.stop)
        self.splicer = Splicer(reactor, self.pool, clientSide, daemonSide, ended, budget, os.getuid())
        self.splicer.start()

        def cleanUp() -> None:
            self.splicer.close()
            self.pool.close()
            for sock in (self.client, self.daemon):
                sock.close()

        self.addCleanup(cleanUp)

    def sendAll(self, sock: socket.socket, data: bytes) -> defer.Deferred:
        """Send C{data} as the far end's writes are taken; fire with the count."""
        sent = [0]

        def more() -> bool:
            try:
                while sent[0] < len(data):
                    sent[0] += sock.send(data[sent[0] : sent[0] + 65536])
            except BlockingIOError:
                pass
            return sent[0] == len(data)

        return pollUntil(more).addCallback(lambda _: sent[0])

    def keepSending(self, sock: socket.socket) -> list:
        """
        Send for as long as the socket takes it (a client whose stdin still
        flows); the list says how many bytes went and how sending ended.
        """
        state: list = [0, None]
        chunk = b"i" * 65536

        def send() -> None:
            try:
                while True:
                    state[0] += sock.send(chunk)
            except BlockingIOError:
                pass
            except OSError as e:
                state[1] = e.errno
                loop.stop()

        loop = task.LoopingCall(send)
        loop.start(0.005)

        def stop() -> None:
            if loop.running:
                loop.stop()

        self.addCleanup(stop)
        return state

    def readAll(self, sock: socket.socket, pause: float = 0.002) -> defer.Deferred:
        """
        Read to the end, slowly (a small read per turn); fire with what came
        and how it ended (C{None}: an EOF).
        """
        received = bytearray()
        end: list = []

        def read() -> bool:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return False
            except OSError as e:
                end.append(e.errno)
                return True
            if not data:
                end.append(None)
                return True
            received.extend(data)
            return False

        async def slowly() -> tuple[bytes, Optional[int]]:
            deadline = reactor.seconds() + 20
            while not read():
                if reactor.seconds() > deadline:
                    raise AssertionError(f"still reading after {len(received)} bytes")
                await task.deferLater(reactor, pause)
            return bytes(received), end[0]

        return defer.ensureDeferred(slowly())

    @defer.inlineCallbacks
    def test_daemonClosesWhileTheClientSends(self):
        """
        A daemon that stops reading, writes its last output and closes,
        while the client keeps sending and reads slowly: the client gets
        every byte the daemon's sends took, then the end; its own sends fail
        (as they would direct); the relay ends once the output is through,
        saying the daemon went away, and holds no descriptor after.
        """
        # What the reactor may open on its first turn is not the relay's.
        yield task.deferLater(reactor, 0)
        before = openDescriptors()
        self.startSplicer()
        output = os.urandom(736_000)
        sending = self.keepSending(self.client)
        # The client's bytes pile up in the daemon's socket, then in the
        # router: the daemon's end is waited on for writing only.
        yield pollUntil(lambda: self.splicer._daemon.writing)
        sent = yield self.sendAll(self.daemon, output)
        self.daemon.close()
        received, end = yield self.readAll(self.client)
        self.assertEqual((len(received), received == output), (sent, True))
        self.assertIn(end, (None, errno.ECONNRESET))
        ended = yield self.endedAs
        self.assertTrue(ended.startswith("docker:"), ended)
        yield pollUntil(lambda: sending[1] is not None)
        self.assertIn(sending[1], (errno.EPIPE, errno.ECONNRESET))
        self.pool.close()
        self.client.close()
        # The client's socket goes at the budget's next sweep (it held a
        # grant); nothing else is left.
        yield pollUntil(lambda: openDescriptors() == before)

    @defer.inlineCallbacks
    def test_daemonStopsReading(self):
        """
        A daemon that shuts its reading (the client's direction fails with
        EPIPE) and goes on writing: its output still reaches the client,
        through to its half-close, and the client's sends fail.
        """
        self.startSplicer()
        self.daemon.shutdown(socket.SHUT_RD)
        sending = self.keepSending(self.client)
        yield pollUntil(lambda: sending[1] is not None)
        self.assertEqual(sending[1], errno.EPIPE)
        self.assertFalse(self.endedAs.called)
        output = os.urandom(300_000)
        yield self.sendAll(self.daemon, output)
        self.daemon.shutdown(socket.SHUT_WR)
        received, end = yield self.readAll(self.client)
        self.assertEqual((len(received), received == output), (len(output), True))
        # The client's unread sends make its end a reset, after the bytes.
        self.assertIn(end, (None, errno.ECONNRESET))
        self.assertEqual((yield self.endedAs), "docker:EPIPE")

    @defer.inlineCallbacks
    def test_clientHangsUpEndsTheRelay(self):
        """
        The client going away while the daemon's output waits for it ends
        the relay, as it always did.
        """
        self.startSplicer()
        sending = self.keepSending(self.daemon)
        yield pollUntil(lambda: self.splicer._client.writing)
        self.client.close()
        ended = yield self.endedAs
        self.assertTrue(ended.startswith("client:"), ended)
        yield pollUntil(lambda: sending[1] is not None)

    @defer.inlineCallbacks
    def test_aDirectionWaitsForAPipe(self):
        """
        With every pipe of the reserve lent, a direction with bytes to move
        waits (its source unread) and moves them once a pipe is given back;
        the reserve ends as full as it began.
        """
        pool = PipePool(1)
        held = pool.take(False, None)
        self.startSplicer(pool)
        self.client.send(b"request")
        yield pollUntil(lambda: pool.waiting)
        self.assertFalse(self.splicer._client.reading)
        self.assertEqual(self.splicer.toDocker, 0)
        pool.give(held)
        self.assertEqual(pool.waiting, 0)
        yield pollUntil(lambda: self.splicer.toDocker == 7)
        self.assertEqual(self.daemon.recv(100), b"request")
        yield pollUntil(lambda: self.splicer._up.pipe is None)
        self.assertEqual(pool.open, [1, 0])

    def test_poolWaitersInOrder(self):
        """
        A pipe given back goes to the first direction that waited; one that
        stops waiting gets none; a pipe that may hold bytes is replaced.
        """
        pool = PipePool(1)
        self.addCleanup(pool.close)
        got: list = []

        class Waiter:
            def __init__(self, name):
                self.name = name

            def given(self, pipe):
                got.append((self.name, pipe))

        first, second, third = Waiter("first"), Waiter("second"), Waiter("third")
        pipe = pool.take(False, first)
        self.assertIsNotNone(pipe)
        self.assertIsNone(pool.take(False, first))
        self.assertIsNone(pool.take(True, second))
        self.assertIsNone(pool.take(False, third))
        pool.cancel(first)
        pool.give(pipe)
        self.assertEqual(got, [("second", pipe)])
        pool.discard(pipe)
        self.assertEqual([name for name, _ in got], ["second", "third"])
        self.assertEqual((pool.waiting, pool.open), (0, [1, 0]))
        pool.give(got[-1][1])
        self.assertEqual(pool.take(False, first), got[-1][1])
