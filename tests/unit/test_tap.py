"""
The command line, the services it makes, and log levels on their way to syslog.
"""

import io
import os
import socket
import subprocess
import sys
import syslog
from contextlib import redirect_stdout
import tomllib
from pathlib import Path
from types import SimpleNamespace

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter import __version__
from dockerrouter.base.logging import RouterLogger
from dockerrouter.service.tap import DEFAULT_BACKLOG, CannotListen, Options, makeService, withBacklog


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["listen"], ["unix:/var/run/docker.sock:mode=666:lockfile=1"])
        self.assertEqual(options["user-socket"], [])
        self.assertEqual((options["connect-timeout"], options["shutdown-timeout"]), (5, 10))

    def test_version(self) -> None:
        """
        C{--version} names our version, not Twisted's (usage.Options' own).
        """
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            parse("--version")
        self.assertEqual(caught.exception.code, 0)
        self.assertEqual(out.getvalue(), f"docker-router {__version__}\n")

    def test_versionInOnePlace(self) -> None:
        """
        The version is written in the package only: the project's metadata
        names no version of its own, and takes the package's.
        """
        with open(Path(__file__).parents[2] / "pyproject.toml", "rb") as f:
            project = tomllib.load(f)
        self.assertNotIn("version", project["project"])
        self.assertIn("version", project["project"]["dynamic"])
        self.assertEqual(
            project["tool"]["setuptools"]["dynamic"]["version"], {"attr": "dockerrouter.__version__"}
        )

    def test_repeatableListen(self) -> None:
        options = parse("--listen", "unix:/tmp/a.sock", "--listen", "tcp:2375:interface=127.0.0.1")
        self.assertEqual(options["listen"], ["unix:/tmp/a.sock", "tcp:2375:interface=127.0.0.1"])

    def test_badTemplate(self) -> None:
        for template in ("/run/{gid}/docker.sock", "/run/{0}", "relative/{uid}.sock"):
            self.assertRaises(UsageError, parse, "--user-socket", template)

    def test_badTimeouts(self) -> None:
        self.assertRaises(UsageError, parse, "--connect-timeout", "0")
        self.assertRaises(UsageError, parse, "--shutdown-timeout", "soon")


class _ListeningReactor(MemoryReactorClock):
    """
    A MemoryReactor whose ports have the listening socket the router guards,
    the logger it keeps, and a file at their path.
    """

    def listenUNIX(self, address, *args, **kwargs):
        port = super().listenUNIX(address, *args, **kwargs)
        port.socket = SimpleNamespace(family=socket.AF_UNIX, type=socket.SOCK_STREAM, proto=0)
        port._logger = Logger()
        port.lockFile = None
        open(address, "w").close()
        return port


class RefusalTests(SynchronousTestCase):
    """
    What can't be listened on is refused by L{makeService}, before twistd
    forks, as a L{CannotListen} printed as one line.
    """

    def setUp(self) -> None:
        self.patch(sys, "excepthook", sys.excepthook)

    def refusal(self, *argv: str) -> str:
        with self.assertRaises(CannotListen) as caught:
            makeService(parse(*argv), reactor=MemoryReactorClock())
        return str(caught.exception)

    def test_badEndpoint(self) -> None:
        self.assertIn("bad --listen endpoint", self.refusal("--listen", "carrier-pigeon:1"))

    def test_missingDirectory(self) -> None:
        message = self.refusal("--listen", "unix:/nonexistent/dir/docker.sock")
        self.assertIn("/nonexistent/dir does not exist", message)

    def test_onlyUnixStreamSockets(self) -> None:
        """
        A TCP endpoint carries no peer credentials (every client would be
        "uid -1"): refused, as is an adopted socket of another family.
        """
        self.inherit(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        for description in ("tcp:2375", "tcp6:2375", "systemd:domain=INET:index=0"):
            self.assertIn("only Unix stream sockets", self.refusal("--listen", description))

    def inherit(self, sock: socket.socket) -> None:
        """Make C{sock} the descriptor systemd hands over (C{LISTEN_FDS})."""
        from twisted.internet import endpoints
        from twisted.python.systemd import ListenFDs

        self.addCleanup(sock.close)
        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs([sock.fileno()]))

    def test_adoptedDatagramSocket(self) -> None:
        """
        A descriptor systemd hands over (C{LISTEN_FDS}) that is a Unix
        datagram socket is refused, naming what it is.
        """
        self.inherit(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        message = self.refusal("--listen", "systemd:domain=UNIX:index=0")
        self.assertIn("AF_UNIX/SOCK_DGRAM socket, not a Unix stream socket", message)

    def test_anotherRouterHoldsTheLock(self) -> None:
        """
        A live process holding the path's lock file is named by its pid.
        """
        path = os.path.abspath(self.mktemp())
        holder = subprocess.Popen(["sleep", "60"])
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        os.symlink(str(holder.pid), path + ".lock")
        message = self.refusal("--listen", f"unix:{path}:lockfile=1")
        self.assertIn(f"another docker-router (pid {holder.pid}) is already listening", message)

    def test_excepthookOnlyOnFailure(self) -> None:
        """
        Only a refusal installs the one-line excepthook; a good start leaves
        the process's hook alone.
        """
        before = sys.excepthook
        makeService(parse("--listen", f"unix:{self.mktemp()}"), reactor=MemoryReactorClock())
        self.assertIs(sys.excepthook, before)
        self.refusal("--listen", "tcp:2375")
        self.assertIsNot(sys.excepthook, before)
        written = []
        self.patch(sys, "stderr", type("W", (), {"write": lambda self, t: written.append(t)})())
        sys.excepthook(CannotListen, CannotListen("docker-router: cannot listen on x: y"), None)
        self.assertEqual(written, ["docker-router: cannot listen on x: y\n"])


class ServiceTests(SynchronousTestCase):
    def test_listensOnEachEndpointWithBacklog(self) -> None:
        reactor = _ListeningReactor()
        path, other = self.mktemp(), self.mktemp()
        options = parse(
            "--listen", f"unix:{path}:mode=666", "--listen", f"unix:{other}:backlog=7", "--control", ""
        )
        service = makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(
            [(p[0], p[2], p[3]) for p in reactor.unixServers],
            [(path, DEFAULT_BACKLOG, 0o666), (other, 7, 0o666)],
        )

    def test_inFlightBudget(self) -> None:
        """The in-flight options, in MiB, reach the factory's budget."""
        options = parse("--max-in-flight-per-user", "8", "--max-in-flight", "64")
        service = makeService(options, reactor=_ListeningReactor())
        [factory] = {child.factory for child in service if hasattr(child, "factory")}
        self.assertEqual((factory.budget.perUser, factory.budget.total), (8 << 20, 64 << 20))
        defaults = parse()
        self.assertEqual((defaults["max-in-flight-per-user"], defaults["max-in-flight"]), (16, 256))

    def test_withBacklog(self) -> None:
        self.assertEqual(withBacklog("unix:/x"), f"unix:/x:backlog={DEFAULT_BACKLOG}")
        self.assertEqual(withBacklog("unix:/x:backlog=9"), "unix:/x:backlog=9")
        self.assertEqual(withBacklog("systemd:domain=UNIX:index=0"), "systemd:domain=UNIX:index=0")


class SyslogTests(SynchronousTestCase):
    def test_prioritiesFollowLevels(self) -> None:
        """
        Under C{twistd --syslog}, warnings are LOG_WARNING and errors LOG_ERR
        in the daemon facility, not LOG_ALERT for every error.
        """
        log = RouterLogger()
        with capturedLogs() as events:
            log.info("i")
            log.warn("w")
            log.error("e")
        self.assertEqual(
            [(e["log_level"], e["syslogPriority"], e["syslogFacility"]) for e in events],
            [
                (LogLevel.info, syslog.LOG_INFO, syslog.LOG_DAEMON),
                (LogLevel.warn, syslog.LOG_WARNING, syslog.LOG_DAEMON),
                (LogLevel.error, syslog.LOG_ERR, syslog.LOG_DAEMON),
            ],
        )


class SyslogObserverTests(SynchronousTestCase):
    def test_throughTwistdSyslogObserver(self) -> None:
        """
        What C{twistd --syslog} does with the events: Twisted's own syslog
        observer, behind the legacy wrapper twistd puts around it, sends a
        warning as LOG_WARNING and an error as LOG_ERR, in the daemon
        facility.
        """
        from twisted.logger import LegacyLogObserverWrapper
        from twisted.python import syslog as twistedSyslog

        sent: list[int] = []
        self.patch(twistedSyslog.SyslogObserver, "openlog", lambda *args: None)
        self.patch(twistedSyslog.SyslogObserver, "syslog", lambda self, priority, line: sent.append(priority))
        # What twistd --syslog does; its annotation wants the new-style interface.
        observer = LegacyLogObserverWrapper(twistedSyslog.SyslogObserver("docker-router").emit)  # type: ignore[arg-type]  # the legacy observer takes legacy events
        log = RouterLogger(observer=observer)
        log.info("i")
        log.warn("w")
        log.error("e")
        self.assertEqual(
            sent,
            [
                syslog.LOG_INFO | syslog.LOG_DAEMON,
                syslog.LOG_WARNING | syslog.LOG_DAEMON,
                syslog.LOG_ERR | syslog.LOG_DAEMON,
            ],
        )


class AdviceOptionTests(SynchronousTestCase):
    def test_siteAdviceAndSetupTool(self) -> None:
        """
        Issue 8.7: C{--advice} reaches every message's advice, and the setup
        tool is looked for once, at start.
        """
        from dockerrouter.routing import configured

        looked: list[int] = []

        def findSetupTool() -> str:
            looked.append(1)
            return "/opt/x/setup.sh"

        self.patch(configured, "findSetupTool", findSetupTool)
        options = parse("--listen", f"unix:{self.mktemp()}", "--advice", "{advice}; see https://wiki.example/docker")
        service = makeService(options, reactor=MemoryReactorClock())
        [factory] = {s.factory for s in service if hasattr(s, "factory")}
        advice = factory.settings.resolver.advice
        self.assertEqual((advice.setupTool, advice.site), ("/opt/x/setup.sh", "{advice}; see https://wiki.example/docker"))
        self.assertEqual(looked, [1])
