"""
Every place the router relies on how Twisted (or CPython's socket) works
inside, rather than on their public interfaces.

Each function here names the assumption it makes, and
C{tests/unit/test_compat.py} checks each one against the installed Twisted,
so that an upgrade that changes one fails a test instead of a host.
"""

import os
import socket
import stat
from typing import IO, Any, Callable, Optional, Union, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, tcp, unix
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, _ISupportsExitSignalCapturing
from twisted.logger import FileLogObserver, LogPublisher
from twisted.python import lockfile, usage
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from dockerrouter.base.endpoints import bindInode


def raiseListenErrors(service: StreamServerEndpointService) -> None:
    """
    Make a L{StreamServerEndpointService}'s C{privilegedStartService} raise
    a listen failure, rather than log it and run on without the listener
    (twistd then exits non-zero).

    Assumes: C{_raiseSynchronously} does that, as C{strports.service} sets
    it.
    """
    service._raiseSynchronously = True


def listeningPort(service: StreamServerEndpointService) -> unix.Port:
    """
    The port a L{StreamServerEndpointService} listens on, once its
    C{privilegedStartService} has run (a Unix or adopted endpoint listens at
    once).

    Assumes: the service keeps the endpoint's C{listen} Deferred as
    C{_waitingForPort}.
    """
    return service._waitingForPort.result


def replaceListeningSocket(port: tcp.Port, wrap: Callable[[socket.socket], object]) -> None:
    """
    Put C{wrap(port.socket)} in the place of a listening port's socket.

    Assumes: the port calls C{self.socket.accept()} in C{doRead}, and looks
    the socket up on every call.
    """
    # The wrapper stands in for the socket: the port calls nothing else on it.
    port.socket = cast(socket.socket, wrap(port.socket))


def keepAcceptLogger(port: tcp.Port) -> None:
    """
    Give a listening port its own logger, made once: C{Port.doRead} reads
    C{self._logger} twice for every accept, and each read of a L{Logger}
    class attribute makes a new Logger.

    Assumes: C{_logger} is a L{Logger} on the port's class, which (having no
    C{__set__}) an instance attribute of the same name overrides.
    """
    port._logger = port._logger


def guardStop(
    port: unix.Port, own: Optional[tuple[int, int]], leftAlone: Callable[[str], None], keepLock: bool = False
) -> None:
    """
    Make a Unix port's stop leave alone what isn't its own.

    Twisted's C{unix.Port.connectionLost} unlinks the port's path, whatever
    is there by then, and its C{tcp.Port} base calls C{shutdown()} on the
    listening socket before closing it.  An adopted socket (C{own} is
    C{None}) is systemd's: a C{shutdown()} would stop it accepting in
    systemd's hands too, and its path is systemd's.  A socket the router
    bound is unlinked only while the path still holds it (C{own}); any other
    file there is someone else's, and C{leftAlone} is told its path.
    C{keepLock}: the socket outlives this process (systemd's file
    descriptor store holds it), so its lock file is left too, to go stale
    with this process (the next router takes it over, or, binding anew,
    removes the path it guards).

    Assumes: C{unix.Port.connectionLost} does nothing but unlink the path,
    release C{lockFile}, and call C{tcp.Port.connectionLost}; that
    C{tcp.Port} honours C{_shouldShutdown}; and that the port calls
    C{self.connectionLost} as looked up on the instance.
    """
    path = os.fsdecode(port.getHost().name)
    if own is None:
        port._shouldShutdown = False

    def connectionLost(reason: Failure) -> None:
        if own is not None:
            try:
                if bindInode(path) == own:
                    os.unlink(path)
                else:
                    leftAlone(path)
            except FileNotFoundError:
                pass
        if port.lockFile is not None and not keepLock:
            port.lockFile.unlock()
        tcp.Port.connectionLost(port, reason)

    port.connectionLost = connectionLost  # type: ignore[method-assign]  # on this port only


def inheritedDescriptors() -> dict[str, int]:
    """
    The descriptors systemd passed this process (C{LISTEN_FDS}), by name
    (C{LISTEN_FDNAMES}): its sockets' listeners and what its file descriptor
    store held.

    Assumes: Twisted's C{systemd:} endpoint parser reads (and removes from
    the environment) C{LISTEN_FDS} once, when L{twisted.internet.endpoints}
    is imported, into the L{ListenFDs} it keeps as C{_sddaemon}.
    """
    return endpoints._SystemdParser._sddaemon.inheritedNamedDescriptors()


def lockHolder(path: str) -> Optional[int]:
    """
    The pid of a live process, other than this one, that holds the lock
    file of a Unix endpoint with C{lockfile=1} at C{path}.

    Assumes: C{FilesystemLock} is a symlink at C{path + ".lock"} whose
    target is the holder's pid.
    """
    try:
        pid = int(lockfile.readlink(path + ".lock"))
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def dropOwnLock(path: str) -> None:
    """
    Remove the lock file at C{path + ".lock"} if this process made it: a
    listen that failed after taking the lock leaves it behind.

    Assumes: as L{lockHolder}.
    """
    lock = path + ".lock"
    try:
        if lockfile.readlink(lock) == str(os.getpid()):
            lockfile.rmlink(lock)
    except OSError:
        pass


def forgetExitSignal(reactor: object) -> None:
    """
    Make twistd exit 0 after a shutdown that a signal asked for.

    Assumes: a reactor that provides C{_ISupportsExitSignalCapturing}
    records SIGTERM or SIGINT in C{_exitSignal}, which twistd reads once the
    reactor has stopped and re-raises on itself.
    """
    if _ISupportsExitSignalCapturing.providedBy(reactor):
        reactor._exitSignal = None


def handOverReading(reactor: IReactorFDSet, transport: FileDescriptor, reader: IReadDescriptor) -> None:
    """
    Let go of a connection's transport without closing its socket, whose
    descriptor C{reader} (a reader of the same descriptor) now owns, and
    have the reactor read for C{reader} instead.

    An epoll reactor still reading the transport keeps the descriptor in its
    epoll set and only dispatches its events to C{reader}: the kernel is not
    asked to forget it and watch it again (two C{epoll_ctl} calls per
    connection).  Any other reactor, or a paused transport, gets
    C{pauseProducing} and C{addReader}.

    Assumes: an C{EPollReactor} keeps the descriptors it reads in C{_reads}
    and those it writes in C{_writes}, and passes each event on a descriptor
    to C{_selectables[fd]}; a transport out of the reactor's readers (it has
    written nothing, so it is in no writers either) is referenced by nothing
    in Twisted, and closes nothing when collected (it has no C{__del__}; the
    socket object lives on in the relay).
    """
    fd = reader.fileno()
    if (
        isinstance(reactor, EPollReactor)
        and reactor._selectables.get(fd) is transport
        and fd in reactor._reads
        and fd not in reactor._writes
    ):
        reactor._selectables[fd] = reader
        return
    transport.pauseProducing()
    reactor.addReader(reader)


# The name Twisted's textFileLogObserver gives the formatter it makes.
_TEXT_FORMAT = "textFileLogObserver.<locals>.formatEvent"


def textFileObservers(publisher: LogPublisher) -> list[FileLogObserver]:
    """
    The observers of C{publisher} that C{textFileLogObserver} made (as
    twistd does for C{--logfile} and C{-n}), whose C{formatEvent} may be
    replaced.  Assumes a publisher keeps its observers in C{_observers} and
    that the formatter is known by its qualified name.
    """
    return [
        observer
        for observer in getattr(publisher, "_observers", ())
        if isinstance(observer, FileLogObserver)
        and getattr(observer.formatEvent, "__qualname__", "") == _TEXT_FORMAT
    ]


def wrapOutFile(observer: FileLogObserver, wrap: Callable[[IO[Any]], Any]) -> None:
    """
    Have C{observer} write to C{wrap(}the file it writes to C{)}.

    Assumes: a C{FileLogObserver} keeps its file in C{_outFile}, and writes
    each event to it with C{write}, then C{flush}.
    """
    observer._outFile = wrap(observer._outFile)


def keepDeviceInPlace(file: Any) -> Any:
    """
    Make a twistd log file that is not a regular file (C{--logfile=/dev/null},
    a FIFO) never rotate: a L{LogFile} renames its file away once it has
    written C{rotateLength} bytes, or on SIGUSR1, which, run as root on
    /dev/null, leaves the host a regular file where its null device was.
    Any other file is left as it is.

    Assumes: a L{LogFile} rotates only when C{shouldRotate()} (which reads
    C{rotateLength}) says so, or when its C{rotate} is called.

    @return: C{file}
    """
    if isinstance(file, LogFile):
        try:
            regular = stat.S_ISREG(os.stat(file.path).st_mode)
        except OSError:
            regular = True
        if not regular:
            file.rotateLength = None
            file.rotate = lambda: None  # type: ignore[method-assign]  # SIGUSR1 calls it
    return file


def recordGivenOptions(options: usage.Options, record: Callable[[str], object]) -> None:
    """
    Have C{options} call C{record(name)} for each option the command line
    gives, then handle it as before: what the command line gave wins over a
    configuration file.

    Assumes: C{usage.Options} handles each option it parses by calling
    C{_dispatch[name](option, value)}, where each entry is a
    C{CoerceParameter} (for C{optParameters}) or a callable (flags and
    C{opt_} methods), all made in C{__init__}.
    """
    for name, handler in list(options._dispatch.items()):
        options._dispatch[name] = _recording(name, handler, record)


def _recording(
    name: str,
    handler: Union[usage.CoerceParameter, Callable[[str, str], object]],
    record: Callable[[str], object],
) -> Callable[[str, str], None]:
    def dispatch(option: str, value: str) -> None:
        record(name)
        if isinstance(handler, usage.CoerceParameter):
            handler.dispatch(option, value)
        else:
            handler(option, value)

    return dispatch


def rawAccept(sock: socket.socket) -> tuple[int, Any]:
    """
    Accept a connection on C{sock}: its descriptor and address, without
    C{socket.accept}'s per-call lookups (the caller makes the socket object).

    Assumes: CPython's C{socket.socket} has C{_accept}, the C method
    C{socket.accept} wraps, which does that.
    """
    accepted: tuple[int, Any] = sock._accept()  # type: ignore[attr-defined]  # CPython's, undocumented
    return accepted
