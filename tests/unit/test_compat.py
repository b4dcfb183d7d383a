"""
The assumptions L{dockerrouter.base._compat} makes about Twisted's insides, each
checked against the installed Twisted: an upgrade that changes one fails
here, loudly, rather than on a host.
"""

import gc
import inspect
import os
import select
import shutil
import socket
import tempfile
from typing import IO, Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application import app, strports
from twisted.internet import reactor, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import CannotListenError
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorSocket, IReadDescriptor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python import lockfile, usage
from twisted.python.logfile import LogFile
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from dockerrouter.base import _compat
from dockerrouter.base.endpoints import bindInode


def connectNonBlocking(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.connect(path)
    return sock


def queued(path: str, most: int) -> int:
    """How many connects a listener that doesn't accept takes (up to C{most})."""
    held: list[socket.socket] = []
    try:
        while len(held) < most:
            try:
                held.append(connectNonBlocking(path))
            except BlockingIOError:
                break
        return len(held)
    finally:
        for sock in held:
            sock.close()


class PortTests(TestCase):
    """A real Unix port on the real reactor."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="dr-compat-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "s.sock")
        # The ServerFactory adoptStreamPort takes (forProtocol is typed to make a Factory).
        self.factory = ServerFactory()
        self.factory.protocol = Protocol

    def listen(self, **kwargs):
        port = reactor.listenUNIX(self.path, self.factory, **kwargs)
        return port

    def adopted(self, backlog: int = 4096):
        """A port adopted from a listening socket we keep, as systemd does."""
        ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        ours.bind(self.path)
        ours.listen(backlog)
        ours.setblocking(False)
        port = IReactorSocket(reactor).adoptStreamPort(ours.fileno(), socket.AF_UNIX, self.factory)
        return ours, port

    def test_raiseListenErrors(self):
        """
        A service told to raises the listen failure from
        C{privilegedStartService}, as C{strports.service} makes it.
        """
        self.assertTrue(strports.service("unix:" + self.path, self.factory)._raiseSynchronously)
        missing = os.path.join(self.path, "nowhere", "s.sock")
        service = StreamServerEndpointService(UNIXServerEndpoint(reactor, missing), self.factory)
        _compat.raiseListenErrors(service)
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_listeningPort(self):
        """The service keeps its port where L{listeningPort} looks."""
        service = StreamServerEndpointService(UNIXServerEndpoint(reactor, self.path), self.factory)
        _compat.raiseListenErrors(service)
        service.privilegedStartService()
        port = _compat.listeningPort(service)
        self.assertEqual(os.fsdecode(port.getHost().name), self.path)
        return service.stopService()

    def test_twistedUnlinksAndShutsDownAdopted(self):
        """
        Why L{guardStop} exists: unguarded, Twisted unlinks the path of an
        adopted socket and shuts it down for every holder (if this starts
        failing, Twisted no longer does, and the guard may go).
        """
        ours, port = self.adopted()

        def stopped(_):
            self.assertFalse(os.path.exists(self.path))
            # What systemd sees: "Got POLLHUP on a listening socket".
            poller = select.poll()
            poller.register(ours, select.POLLIN)
            self.assertTrue(poller.poll(0)[0][1] & select.POLLHUP)

        return port.stopListening().addCallback(stopped)

    def test_adoptedKeptWhole(self):
        """
        Guarded, an adopted socket's stop leaves it listening, at its path,
        with the backlog it had.
        """
        ours, port = self.adopted()
        _compat.guardStop(port, None, self.fail)

        def stopped(_):
            self.assertTrue(os.path.exists(self.path))
            poller = select.poll()
            poller.register(ours, select.POLLIN)
            self.assertEqual(poller.poll(0), [])
            client = connectNonBlocking(self.path)
            self.addCleanup(client.close)
            ours.accept()[0].close()

        return port.stopListening().addCallback(stopped)

    def test_adoptionResetsTheBacklog(self):
        """
        Twisted listen()s again on an adopted socket with its default backlog
        of 50, which is why the router listen()s once more with its own.
        """
        ours, port = self.adopted(backlog=200)
        self.addCleanup(port.stopListening)
        self.assertEqual(queued(self.path, 100), 51)
        port.socket.listen(200)
        self.assertEqual(queued(self.path, 100), 100)

    def test_ownUnlinked(self):
        """The socket this port bound is unlinked, and its lock released."""
        port = self.listen(wantPID=True)
        _compat.guardStop(port, bindInode(self.path), self.fail)

        def stopped(_):
            self.assertFalse(os.path.exists(self.path))
            self.assertFalse(os.path.lexists(self.path + ".lock"))
            self.assertFalse(port.connected)

        return port.stopListening().addCallback(stopped)

    def test_anotherLeftAlone(self):
        """A socket someone else bound at the path since stays, and is named."""
        port = self.listen(wantPID=True)
        leftAlone = []
        _compat.guardStop(port, bindInode(self.path), leftAlone.append)
        os.unlink(self.path)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        other.bind(self.path)
        other.listen(1)

        def stopped(_):
            self.assertEqual(leftAlone, [self.path])
            connectNonBlocking(self.path).close()
            self.assertFalse(os.path.lexists(self.path + ".lock"))

        return port.stopListening().addCallback(stopped)

    def test_keptWithItsLock(self):
        """
        A socket the store keeps (C{keepLock}): its stop leaves it at its
        path, listening, and its lock file in place, to go stale with this
        process.
        """
        port = self.listen(wantPID=True)
        _compat.guardStop(port, None, self.fail, keepLock=True)
        kept = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(kept.close)

        def stopped(_):
            self.assertTrue(os.path.exists(self.path))
            self.assertEqual(lockfile.readlink(self.path + ".lock"), str(os.getpid()))
            client = connectNonBlocking(self.path)
            self.addCleanup(client.close)
            kept.accept()[0].close()

        return port.stopListening().addCallback(stopped)

    def test_connectionLostDoesNoMore(self):
        """
        L{guardStop} replaces C{unix.Port.connectionLost} by what it does:
        unlink, unlock, and C{tcp.Port.connectionLost}.  Anything else it
        starts doing would be skipped.
        """
        names = set(unix.Port.connectionLost.__code__.co_names)
        self.assertLessEqual(
            names,
            {"_inFilesystemNamespace", "_bindPath", "port", "os", "unlink", "lockFile", "unlock", "tcp", "Port", "connectionLost"},
        )
        self.assertIn("_shouldShutdown", inspect.getsource(tcp._SocketCloser._closeSocket))

    def test_replaceListeningSocket(self):
        """The port accepts through whatever is in its C{socket}."""
        port = self.listen()
        self.addCleanup(port.stopListening)
        accepted = Deferred()

        class Recording:
            def __init__(self, sock):
                self.sock = sock

            def accept(self):
                if not accepted.called:
                    accepted.callback(None)
                return self.sock.accept()

            def __getattr__(self, name):
                return getattr(self.sock, name)

        _compat.replaceListeningSocket(port, Recording)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(self.path)
        return accepted


    def test_keepAcceptLogger(self):
        """
        A port's logger is made anew on every read, until it is kept; the
        kept one is a logger of the port, and the port still accepts.
        """
        port = self.listen()
        self.addCleanup(port.stopListening)
        self.assertIsNot(port._logger, port._logger)
        _compat.keepAcceptLogger(port)
        self.assertIs(port._logger, port._logger)
        self.assertIsInstance(port._logger, Logger)
        self.assertIs(port._logger.source, port)
        self.assertIn("_logger", inspect.getsource(tcp.Port.doRead))
        accepted = Deferred()
        port.factory.buildProtocol = lambda addr: accepted.callback(None)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(self.path)
        return accepted


class LockTests(TestCase):
    def test_lockIsAPidSymlink(self):
        """C{FilesystemLock} is a symlink to the holder's pid."""
        path = os.path.abspath(self.mktemp())
        lock = lockfile.FilesystemLock(path + ".lock")
        self.assertTrue(lock.lock())
        self.assertEqual(os.readlink(path + ".lock"), str(os.getpid()))
        self.assertIsNone(_compat.lockHolder(path), "this process is not another")
        _compat.dropOwnLock(path)
        self.assertFalse(os.path.lexists(path + ".lock"))

    def test_holderAlive(self):
        path = os.path.abspath(self.mktemp())
        os.symlink(str(os.getppid()), path + ".lock")
        self.assertEqual(_compat.lockHolder(path), os.getppid())
        _compat.dropOwnLock(path)
        self.assertTrue(os.path.lexists(path + ".lock"), "another's lock was removed")


class ExitSignalTests(TestCase):
    def test_twistdReadsTheReactorsExitSignal(self):
        """
        twistd exits by re-raising the signal the reactor recorded in
        C{_exitSignal}; clearing it makes twistd exit 0.
        """
        self.assertTrue(hasattr(reactor, "_exitSignal"))
        self.assertIn("reactor._exitSignal", inspect.getsource(app.ApplicationRunner.startReactor))
        self.patch(reactor, "_exitSignal", 15)
        _compat.forgetExitSignal(reactor)
        self.assertIsNone(reactor._exitSignal)


@implementer(IReadDescriptor)
class _Reader:
    """Reads a socket for the reactor; C{readable} fires at the first event."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.readable: Deferred = Deferred()

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        reactor.removeReader(self)
        self.readable.callback(None)

    def connectionLost(self, reason) -> None:
        pass


class HandOverReadingTests(TestCase):
    def handOver(self, paused: bool) -> Deferred:
        """
        A transport let go of (no C{connectionLost}) leaves its socket open
        for the reader that took it over, the reactor reads for that reader
        and holds the transport no more.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        protocol = Protocol()
        IReactorSocket(reactor).adoptStreamConnection(
            # forProtocol is typed to make a plain Factory; it makes the factory's own class.
            ours.fileno(), socket.AF_UNIX, cast(ServerFactory, ServerFactory.forProtocol(lambda: protocol))
        )
        ours.close()
        handle = protocol.transport.getHandle()
        self.addCleanup(handle.close)
        if paused:
            protocol.transport.pauseProducing()
        # What is added to the reactor's readers from here on.
        self.added: list[IReadDescriptor] = []
        addReader = reactor.addReader

        def adding(reader: IReadDescriptor) -> None:
            self.added.append(reader)
            addReader(reader)

        self.patch(reactor, "addReader", adding)
        reader = _Reader(handle)
        assert isinstance(protocol.transport, FileDescriptor)
        _compat.handOverReading(reactor, protocol.transport, reader)
        self.assertIn(reader, reactor.getReaders())
        self.assertNotIn(protocol.transport, reactor.getReaders() + reactor.getWriters())
        self.assertFalse(hasattr(type(protocol.transport), "__del__"))
        protocol.transport = None
        gc.collect()
        theirs.send(b"x")
        return reader.readable.addCallback(lambda _: self.assertEqual(handle.recv(1), b"x"))

    def test_readingTransport(self) -> Deferred:
        """
        The epoll reactor passes a reading transport's registration on:
        nothing is added to its readers anew.
        """
        self.assertIsInstance(reactor, EPollReactor)
        done = self.handOver(paused=False)
        self.assertEqual(self.added, [])
        return done

    def test_pausedTransport(self) -> Deferred:
        return self.handOver(paused=True)


class TextFileObserverTests(TestCase):
    def test_foundByItsFormatter(self) -> None:
        """
        twistd's text file observers are found among a publisher's
        observers by the name of the formatter C{textFileLogObserver} made;
        one with another formatter is not.
        """
        import io

        from twisted.logger import LogPublisher, textFileLogObserver

        made = textFileLogObserver(io.StringIO())
        other = textFileLogObserver(io.StringIO())
        other.formatEvent = lambda event: "mine\n"
        publisher = LogPublisher(made, other)
        self.assertEqual(_compat.textFileObservers(publisher), [made])

    def test_wrapOutFile(self) -> None:
        """A file observer writes, and flushes, each event to the file it is given."""
        import io

        from twisted.logger import textFileLogObserver

        first, second = io.StringIO(), io.StringIO()
        observer = textFileLogObserver(first)
        flushed: list[str] = []

        class Wrapped:
            def __init__(self, file: IO[Any]) -> None:
                self.file = file

            def write(self, text: str) -> None:
                second.write(text)

            def flush(self) -> None:
                flushed.append(second.getvalue())

        _compat.wrapOutFile(observer, Wrapped)
        Logger(observer=observer).info("hello")
        self.assertEqual(first.getvalue(), "")
        self.assertTrue(second.getvalue().endswith("hello\n"))
        self.assertEqual(flushed, [second.getvalue()])


class LogFileTests(TestCase):
    """twistd's log file renames its file away to rotate it: never a device."""

    def logFile(self, target: str) -> LogFile:
        directory = tempfile.mkdtemp(prefix="logfile-")
        self.addCleanup(shutil.rmtree, directory)
        link = os.path.join(directory, "router.log")
        os.symlink(target, link)
        made = LogFile.fromFullPath(link, rotateLength=1000)
        self.addCleanup(made.close)
        return made

    def test_deviceNeverRotates(self) -> None:
        made = _compat.keepDeviceInPlace(self.logFile("/dev/null"))
        for _ in range(5):
            made.write("x" * 600)
        made.rotate()
        self.assertEqual(os.listdir(made.directory), ["router.log"])
        self.assertEqual(os.readlink(made.path), "/dev/null")

    def test_regularFileRotates(self) -> None:
        """Without it, the same writes rotate (the link is renamed away)."""
        directory = tempfile.mkdtemp(prefix="logfile-")
        self.addCleanup(shutil.rmtree, directory)
        made = _compat.keepDeviceInPlace(self.logFile(os.path.join(directory, "real.log")))
        for _ in range(5):
            made.write("x" * 600)
        self.assertIn("router.log.1", os.listdir(made.directory))


class RecordGivenOptionsTests(TestCase):
    def test_eachKindOfOptionRecorded(self) -> None:
        """
        A parameter, a flag and an C{opt_} method given on the command line
        are each recorded by name, and still set what they set.
        """

        class Options(usage.Options):
            optParameters = [["size", None, 1, "", int]]
            optFlags = [["quiet", None, ""]]

            def opt_name(self, value: str) -> None:
                self["name"] = value

        options = Options()
        given: list[str] = []
        _compat.recordGivenOptions(options, given.append)
        options.parseOptions(["--size", "3", "--quiet", "--name", "x"])
        self.assertEqual(sorted(given), ["name", "quiet", "size"])
        self.assertEqual((options["size"], options["quiet"], options["name"]), (3, True, "x"))


class RawAcceptTests(TestCase):
    def test_descriptorAndAddress(self) -> None:
        """It returns an accepted descriptor and the peer's address."""
        server, client = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        server.bind(self.mktemp())
        server.listen(1)
        client.connect(server.getsockname())
        fd, address = _compat.rawAccept(server)
        with socket.socket(fileno=fd) as accepted:
            accepted.sendall(b"x")
            self.assertEqual(client.recv(1), b"x")
        self.assertEqual(address, "")


class InheritedTests(TestCase):
    def test_theSystemdParsersDescriptors(self):
        """
        What systemd passed, by name, is what the C{systemd:} endpoint
        parser read from the environment at import.
        """
        from twisted.internet import endpoints
        from twisted.python.systemd import ListenFDs

        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs([3, 4], ("docker-router.socket", "relay.0.client")))
        self.assertEqual(_compat.inheritedDescriptors(), {"docker-router.socket": 3, "relay.0.client": 4})
