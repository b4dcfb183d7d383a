"""
The C{docker-router} command: tools for the operator of a running router
(C{docker-router status}) and for its users (C{docker-router doctor}).

It talks to the router only through its control endpoint, and imports
nothing of the router's reactor side.
"""

import argparse
import http.client
import json
import os
import socket
import sys
from typing import Any, Optional

from dockerrouter.base.endpoints import unixPath
from dockerrouter.defaults import DEFAULT_CONFIG, DEFAULT_CONTROL


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def socketPath(endpoint: str) -> str:
    """The path of a C{unix:} endpoint string (as given to C{--control})."""
    path = unixPath(endpoint)
    if path is None:
        raise ValueError(f"{endpoint!r}: only unix: control endpoints can be read")
    return path


def getUnix(path: str, url: str, timeout: float = 10.0) -> tuple[http.client.HTTPResponse, bytes]:
    """C{GET url} from a server on the Unix socket at C{path}: the response and its body."""
    connection = _UnixHTTPConnection(path, timeout)
    try:
        connection.request("GET", url)
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def fetchStatus(endpoint: str, timeout: float = 10.0) -> dict[str, Any]:
    response, body = getUnix(socketPath(endpoint), "/status", timeout)
    if response.status != 200:
        raise RuntimeError(json.loads(body).get("message", body.decode("utf-8", "replace")))
    return json.loads(body)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def formatTable(status: dict[str, Any]) -> str:
    rows = [("USER", "UID", "CONNECTIONS", "TO DOCKER", "FROM DOCKER", "OLDEST")]
    for user in status["users"]:
        rows.append(
            (
                user["user"],
                str(user["uid"]),
                str(user["connections"]),
                _size(user["bytesToDocker"]),
                _size(user["bytesFromDocker"]),
                _age(user["oldestSeconds"]),
            )
        )
    totals = status["totals"]
    rows.append(
        (
            "TOTAL",
            f"{totals['users']} users",
            str(totals["connections"]),
            _size(totals["bytesToDocker"]),
            _size(totals["bytesFromDocker"]),
            "",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    for record in status.get("provisioned", []):
        lines.append(f"set up by docker-router: {record['user']} (uid {record['uid']}), "
                     f"rootless {record['kind']}, at {record['at']}")
    return "\n".join(lines) + "\n"


def status(arguments: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.stderr.write("docker-router status needs root (the control socket is root's only)\n")
        return 2
    try:
        live = fetchStatus(arguments.control)
    except (OSError, ValueError, RuntimeError, http.client.HTTPException) as e:
        sys.stderr.write(f"docker-router status: cannot read {arguments.control}: {e}\n")
        return 1
    sys.stdout.write(json.dumps(live, indent=2) + "\n" if arguments.json else formatTable(live))
    return 0


def runDoctor(arguments: argparse.Namespace) -> int:
    from dockerrouter import doctor

    return doctor.run(arguments.user, arguments.config, sys.stdout)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="docker-router", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("status", help="live connections per user, and totals")
    show.add_argument("--json", action="store_true", help="print JSON, for scripts")
    show.add_argument(
        "--control",
        default=DEFAULT_CONTROL,
        help=f"the router's control endpoint (default: {DEFAULT_CONTROL})",
    )
    show.set_defaults(run=status)
    doctor = commands.add_parser(
        "doctor", help="check what a user needs to use Docker through the router, and how to fix it"
    )
    doctor.add_argument("user", nargs="?", help="the user to check (root only; default: you)")
    doctor.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"the router's configuration file, for its routing (default: {DEFAULT_CONFIG})",
    )
    doctor.set_defaults(run=runDoctor)
    arguments = parser.parse_args(argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
