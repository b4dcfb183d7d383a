"""
The command line, the services it makes, and log levels on their way to syslog.
"""

import syslog

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.logging import RouterLogger
from dockerrouter.tap import DEFAULT_BACKLOG, Options, makeService, withBacklog


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["listen"], ["unix:/var/run/docker.sock:mode=666:lockfile=1"])
        self.assertEqual(options["user-socket"], "/run/user/{uid}/docker.sock")
        self.assertEqual((options["connect-timeout"], options["shutdown-timeout"]), (5, 10))

    def test_repeatableListen(self) -> None:
        options = parse("--listen", "unix:/tmp/a.sock", "--listen", "tcp:2375:interface=127.0.0.1")
        self.assertEqual(options["listen"], ["unix:/tmp/a.sock", "tcp:2375:interface=127.0.0.1"])

    def test_badEndpoint(self) -> None:
        with self.assertRaises(UsageError) as caught:
            parse("--listen", "carrier-pigeon:1")
        self.assertIn("bad --listen endpoint", str(caught.exception))

    def test_missingDirectory(self) -> None:
        with self.assertRaises(UsageError) as caught:
            parse("--listen", "unix:/nonexistent/dir/docker.sock")
        self.assertIn("/nonexistent/dir does not exist", str(caught.exception))

    def test_badTemplate(self) -> None:
        for template in ("/run/{home}/docker.sock", "/run/{0}", "relative/{uid}.sock"):
            self.assertRaises(UsageError, parse, "--user-socket", template)

    def test_badTimeouts(self) -> None:
        self.assertRaises(UsageError, parse, "--connect-timeout", "0")
        self.assertRaises(UsageError, parse, "--shutdown-timeout", "soon")


class _ListeningReactor(MemoryReactorClock):
    """A MemoryReactor whose ports have the listening socket the router guards."""

    def listenUNIX(self, *args, **kwargs):
        port = super().listenUNIX(*args, **kwargs)
        port.socket = object()
        return port


class ServiceTests(SynchronousTestCase):
    def test_listensOnEachEndpointWithBacklog(self) -> None:
        reactor = _ListeningReactor()
        path = self.mktemp()
        options = parse("--listen", f"unix:{path}:mode=666", "--listen", "unix:b.sock:backlog=7")
        service = makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(
            [(p[0], p[2], p[3]) for p in reactor.unixServers],
            [(path, DEFAULT_BACKLOG, 0o666), ("b.sock", 7, 0o666)],
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
        observer = LegacyLogObserverWrapper(twistedSyslog.SyslogObserver("docker-router").emit)
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
