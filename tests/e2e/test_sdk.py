"""
The Docker SDK for Python through the router, in a process running as the
test user (the router routes by uid): C{containers.run}, C{exec_run} with
separate streams, and a raw attach socket whose write side is shut down.
Each runs directly against the user's daemon too (C{via}).
"""

import json
import textwrap

from tests.e2e.harness import IMAGE, uniqueName

# Shared by every snippet: a client from DOCKER_HOST, and one JSON line out.
_PRELUDE = f"""
import json, socket
import docker
client = docker.from_env(timeout=60)
IMAGE = {IMAGE!r}
def report(**fields):
    print(json.dumps(fields))
"""


def _runSdk(docker, code: str) -> dict:
    """Run C{code} as the user; the JSON it reported."""
    result = docker.python(_PRELUDE + textwrap.dedent(code))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def test_containersRun(alice):
    """
    C{containers.run} creates, starts, waits for and reads a container.
    """
    reported = _runSdk(
        alice,
        """
        out = client.containers.run(IMAGE, ["sh", "-c", "echo sdk-$((40+2))"], remove=True, network_mode="none")
        report(out=out.decode(), server=client.version()["Version"])
        """,
    )
    assert reported["out"] == "sdk-42\n"
    assert reported["server"][0].isdigit()


def test_execRunDemux(bob):
    """
    C{exec_run(demux=True)}: stdout and stderr come back apart, with the
    exit code.
    """
    name = uniqueName()
    reported = _runSdk(
        bob,
        f"""
        container = client.containers.run(IMAGE, ["sleep", "600"], detach=True, name={name!r}, network_mode="none")
        try:
            result = container.exec_run(["sh", "-c", "echo to-out; echo to-err >&2; exit 3"], demux=True)
            out, err = result.output
            report(code=result.exit_code, out=out.decode(), err=err.decode())
        finally:
            container.remove(force=True)
        """,
    )
    assert reported == {"code": 3, "out": "to-out\n", "err": "to-err\n"}


def test_attachSocketHalfClose(alice):
    """
    C{attach_socket} with stdin: after 100 000 bytes, shutting down our write
    side is the container's EOF (C{wc} answers only then), and its output
    still arrives on the same connection.
    """
    reported = _runSdk(
        alice,
        """
        from docker.utils.socket import frames_iter
        api = client.api
        container = api.create_container(
            IMAGE, ["wc", "-c"], stdin_open=True,
            host_config=api.create_host_config(network_mode="none"))
        try:
            attached = api.attach_socket(container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            raw = attached._sock
            api.start(container)
            raw.sendall(b"x" * 100000)
            raw.shutdown(socket.SHUT_WR)
            raw.settimeout(30)
            streams = {1: b"", 2: b""}
            for stream, data in frames_iter(attached, tty=False):
                streams[stream] += data
            status = api.wait(container, timeout=30)["StatusCode"]
            report(out=streams[1].decode(), err=streams[2].decode(), status=status)
        finally:
            api.remove_container(container, force=True)
        """,
    )
    assert reported == {"out": "100000\n", "err": "", "status": 0}
