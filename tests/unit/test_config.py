"""
The configuration file: merged under the command line, checked with its
line, and reloaded whole (or not at all).
"""

from typing import cast

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from dockerrouter.service import config
from dockerrouter.service.reload import ReloadService
from dockerrouter.service.tap import Options, makeService


class FileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = FilePath(self.mktemp())
        path.setContent(text.encode("utf-8"))
        return path.path

    def parse(self, text: str, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--config", self.write(text)] + list(argv))
        return options

    def test_oneKeyPerLongOption(self) -> None:
        options = self.parse(
            "max-connections-per-user = 50\n"
            "connect-timeout = 2.5\n"
            'user-socket = "/srv/{user}/docker.sock"\n'
            'metrics = ["unix:/tmp/m.sock", "tcp:9999:interface=127.0.0.1"]\n'
            "metrics-per-user = true\n"
        )
        self.assertEqual(options["max-connections-per-user"], 50)
        self.assertEqual(options["connect-timeout"], 2.5)
        self.assertEqual(options["user-socket"], ["/srv/{user}/docker.sock"])
        self.assertEqual(options["metrics"], ["unix:/tmp/m.sock", "tcp:9999:interface=127.0.0.1"])
        self.assertTrue(options["metrics-per-user"])

    def test_commandLineWins(self) -> None:
        options = self.parse(
            'max-connections-per-user = 50\nmetrics = ["unix:/tmp/a.sock"]\n',
            "--max-connections-per-user", "7", "--metrics", "unix:/tmp/b.sock",
        )
        self.assertEqual(options["max-connections-per-user"], 7)
        self.assertEqual(options["metrics"], ["unix:/tmp/b.sock"])

    def test_errorsNameTheLine(self) -> None:
        cases = [
            ("connect-timeout = 1\nmax-connections = = 3\n", "(at line 2, column 19)"),
            ("connect-timeout = 1\n\nmax-conections = 3\n", "line 3: unknown option 'max-conections'"),
            ("\nmax-connections = 0\n", "line 2: max-connections: 0 is not a positive whole number"),
            ('metrics = "unix:/tmp/m.sock"\n', "line 1: metrics must be a list of strings"),
            ('no-subuid = "yes"\n', "line 1: no-subuid must be true or false"),
            ("user-socket = 3\n", "line 1: user-socket must be a list of strings"),
        ]
        for text, expected in cases:
            with self.assertRaises(UsageError) as caught:
                self.parse(text)
            self.assertIn(expected, str(caught.exception))

    def test_start(self) -> None:
        """start = "systemd" reaches the settings; anything else is refused with its line."""
        options = self.parse('start = "systemd"\nstart-timeout = 12\n')
        # No name is looked up here, so a clock without threads stands in.
        reactor = cast("config._ThreadedClock", MemoryReactorClock())
        settings = config.settingsFrom(options, reactor, 1024, lambda text: None)
        self.assertEqual((settings.start, settings.startTimeout), ("systemd", 12.0))
        self.assertIsNone(config.settingsFrom(self.parse(""), reactor, 1024, print).start)
        with self.assertRaises(UsageError) as caught:
            self.parse('\nstart = "sysvinit"\n')
        self.assertIn("line 2: start: 'sysvinit': the only way to start a daemon is systemd", str(caught.exception))

    def test_provision(self) -> None:
        """provision takes a list (or a comma-separated string) in order, and implies start."""
        options = self.parse('provision = ["podman", "docker"]\nprovision-group = "docker-users"\n'
                             'provision-subids = true\nprovision-timeout = 90\n')
        self.assertEqual(
            (options["provision"], options["provision-group"], options["provision-subids"], options["provision-timeout"]),
            (("podman", "docker"), "docker-users", True, 90.0),
        )
        reactor = cast("config._ThreadedClock", MemoryReactorClock())
        self.assertEqual(config.settingsFrom(options, reactor, 1024, lambda text: None).start, "systemd")
        self.assertEqual(self.parse("", "--provision=docker")["provision"], ("docker",))
        self.assertIsNone(self.parse("")["provision"])
        with self.assertRaises(UsageError) as caught:
            self.parse('provision = ["docker", "lxc"]\n')
        self.assertIn("line 1: provision: 'docker,lxc': name what to set up, in order, from docker, podman",
                      str(caught.exception))

    def test_defaultPathOnlyWhenThere(self) -> None:
        self.patch(config, "DEFAULT_CONFIG", self.write("max-connections-per-user = 9\n"))
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["max-connections-per-user"], 9)
        self.patch(config, "DEFAULT_CONFIG", "/nonexistent/docker-router.toml")
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["max-connections-per-user"], 1024)


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.path.setContent(b"max-connections-per-user = 5\n")
        options = Options()
        options.parseOptions(
            ["--config", self.path.path, "--listen", "unix:x.sock", "--control", "", "--connect-timeout", "3"]
        )
        self.service = makeService(options, reactor=MemoryReactorClock())
        [reloads] = [s for s in self.service if isinstance(s, ReloadService)]
        [self.reload] = [r for r in reloads.reloaders if isinstance(r, config.Reloader)]
        self.factory = self.reload.factory

    def test_newSettingsWhole(self) -> None:
        before = self.factory.settings
        self.path.setContent(b"max-connections-per-user = 6\nconnect-timeout = 9\nmetrics-per-user = true\n")
        with capturedLogs() as events:
            said = self.reload()
        after = self.factory.settings
        self.assertIsNot(after, before)
        self.assertEqual(
            (after.maxConnectionsPerUser, after.connectTimeout, after.usersKept), (6, 3, 100)
        )
        self.assertEqual(before.maxConnectionsPerUser, 5)
        self.assertEqual(self.reload.counts, {"ok": 1, "error": 0})
        self.assertEqual(said, f"{self.path.path} applied to new connections")
        self.assertEqual(events, [])

    def test_removedDefaultFileGivesDefaults(self) -> None:
        """
        The default file removed (with, say, a rule in it) and a reload:
        the command line and the defaults apply, not what the file said.
        """
        default = FilePath(self.mktemp())
        default.setContent(b"max-connections-per-user = 5\n")
        self.patch(config, "DEFAULT_CONFIG", default.path)
        options = Options()
        options.parseOptions(["--listen", "unix:x.sock", "--control", ""])
        service = makeService(options, reactor=MemoryReactorClock())
        [reloads] = [s for s in service if isinstance(s, ReloadService)]
        [reload] = [r for r in reloads.reloaders if isinstance(r, config.Reloader)]
        self.assertEqual(reload.factory.settings.maxConnectionsPerUser, 5)
        default.remove()
        said = reload()
        self.assertEqual(reload.factory.settings.maxConnectionsPerUser, 1024)
        self.assertEqual(said, "no configuration file, defaults applied to new connections")

    def test_badFileKeepsTheOld(self) -> None:
        before = self.factory.settings
        self.path.setContent(b"max-connections-per-user = 6\nmax-connections-per-user = 7\n")
        with capturedLogs() as events:
            said = self.reload()
        self.assertEqual(said, f"{self.path.path} not applied (error)")
        self.assertIs(self.factory.settings, before)
        self.assertEqual(self.reload.counts, {"ok": 0, "error": 1})
        [error] = events
        self.assertEqual(error["log_level"].name, "error")
        self.assertIn("line 2", str(error["error"]))

    def test_restartOnlyChangesAreRefused(self) -> None:
        self.path.setContent(b'max-connections-per-user = 6\nmetrics = ["unix:/tmp/m.sock"]\n')
        with capturedLogs() as events:
            self.reload()
        self.assertEqual(self.factory.settings.maxConnectionsPerUser, 6)
        warning = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual([(e["key"], e["old"]) for e in warning], [("metrics", [])])
        self.assertEqual(self.reload.options["metrics"], [])


class ExampleTests(SynchronousTestCase):
    def test_exampleNamesEveryOptionAndIsValid(self) -> None:
        """
        etc/docker-router.toml, uncommented, sets every option but
        C{config} itself, and each value is accepted.
        """
        example = FilePath(__file__).parent().parent().parent().descendant(["etc", "docker-router.toml"])
        lines = [line[1:] for line in example.getContent().decode().splitlines()
                 if line.startswith("#") and " = " in line and not line.startswith("# ")]
        path = FilePath(self.mktemp())
        path.setContent("\n".join(lines).encode())
        options = Options()
        config.applyFile(options, path.path)
        everything = {row[0] for row in Options.optParameters + Options.optFlags} | {"listen", "metrics", "user-socket"}
        self.assertEqual(set(config.readFile(path.path)[0]), everything - {"config"})
