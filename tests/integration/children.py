"""
Small stdlib-only programs that the integration tests run as other users.

Other uids may not be able to read the checkout (CI can clone it anywhere), so
the harness reads this file itself and hands its text to C{python -I -c}.  The
first argument is a JSON object naming the role (C{backend}, C{agent},
C{flipper} or C{echoLoop}) and its settings.  Every role reports to the harness in JSON lines
on stdout, so the harness can wait for facts instead of sleeping.

The harness also imports this module for L{pattern} and L{patternDigest}, so
both ends of a transfer agree on the bytes without shipping them around.
"""

import base64
import errno
import hashlib
import http.client
import json
import os
import random
import socket
import sys
import threading
import time

CHUNK = 1 << 20
_printLock = threading.Lock()


def pattern(seed, size):
    """
    Yield C{size} deterministic pseudo-random bytes in chunks.

    Random rather than repeated bytes, so that a reordered or duplicated chunk
    changes the checksum.
    """
    rng = random.Random(seed)
    remaining = size
    while remaining > 0:
        n = min(CHUNK, remaining)
        yield rng.randbytes(n)
        remaining -= n


def patternDigest(seed, size):
    """
    The sha256 hex digest of L{pattern}C{(seed, size)}.
    """
    digest = hashlib.sha256()
    for chunk in pattern(seed, size):
        digest.update(chunk)
    return digest.hexdigest()


def emit(**fields):
    """
    Tell the harness something: one JSON object per line, flushed at once.
    """
    with _printLock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def _b64(data):
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text):
    return base64.b64decode(text.encode("ascii"))


def errorName(exc):
    """
    A short stable name for a failure (C{ECONNRESET}, C{timeout}, ...), which
    the tests compare against.
    """
    if isinstance(exc, socket.timeout):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def recvAll(sock, keep=65536):
    """
    Read to EOF and say how it ended: a reset is reported, not raised, because
    "the close is clean" is one of the things under test.
    """
    digest = hashlib.sha256()
    head = bytearray()
    total = 0
    error = None
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            digest.update(data)
            total += len(data)
            if len(head) < keep:
                head += data[: keep - len(head)]
    except Exception as e:
        error = errorName(e)
    return {"len": total, "sha": digest.hexdigest(), "head": _b64(head), "error": error}


def sendPattern(sock, seed, size):
    """
    Send L{pattern}C{(seed, size)}; report how much went out and any error.
    """
    digest = hashlib.sha256()
    sent = 0
    error = None
    try:
        for chunk in pattern(seed, size):
            sock.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
    except Exception as e:
        error = errorName(e)
    return {"sent": sent, "sha": digest.hexdigest(), "error": error}


def _readToEOF(conn):
    """
    Read until EOF, returning (count, sha256), so a peer's close never meets
    unread data (which a Unix socket turns into ECONNRESET for the peer).
    """
    digest = hashlib.sha256()
    count = 0
    while True:
        data = conn.recv(CHUNK)
        if not data:
            return count, digest.hexdigest()
        digest.update(data)
        count += len(data)


# Backends: one thread per accepted connection, a mode per behaviour.


def _serveHttp(conn, conf):
    """
    A stand-in Docker daemon: answer any request with 200 and who we are.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    requestLine = head.split(b"\r\n")[0].decode("latin-1")
    payload = json.dumps({"uid": os.getuid(), "tag": conf.get("tag"), "requestLine": requestLine})
    payload = payload.encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (len(payload),) + payload
    )
    conn.shutdown(socket.SHUT_WR)
    _readToEOF(conn)


def _serveEcho(conn, conf):
    """
    Send back every byte; pass the client's EOF on as our own.
    """
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def _serveRecord(conn, conf):
    """
    A decoy: keep every byte it is sent, and report each arrival at once.
    """
    emit(event="accepted")
    total = 0
    try:
        with open(conf["record"], "ab") as f:
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                emit(event="data", bytes=len(data))
                total += len(data)
                f.write(data)
                f.flush()
    finally:
        emit(event="closed", bytes=total)


def _serveCountThenReply(conn, conf):
    """
    Half-close from the client: read to EOF first, then answer with the count
    and checksum of what came, followed by a large reply.
    """
    count, sha = _readToEOF(conn)
    emit(event="received", bytes=count, sha=sha)
    conn.sendall(b"%d %s\n" % (count, sha.encode()))
    for chunk in pattern(conf.get("seed", 0), conf.get("replySize", 0)):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


def _serveGreetThenCount(conn, conf):
    """
    Half-close from the daemon: send a greeting, shut our write side, and keep
    reading what the client still sends.
    """
    for chunk in pattern(conf.get("seed", 0), conf.get("greetSize", 0)):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    count, sha = _readToEOF(conn)
    emit(event="received", bytes=count, sha=sha)


def _serveSource(conn, conf):
    """
    Stream as fast as the peer takes it, reporting progress per chunk so the
    harness can see when backpressure stops us.
    """
    sent = 0
    for chunk in pattern(conf.get("seed", 0), conf["size"]):
        conn.sendall(chunk)
        sent += len(chunk)
        emit(event="sent", bytes=sent)
    conn.shutdown(socket.SHUT_WR)
    _readToEOF(conn)


def _serveLastWords(conn, conf):
    """
    A program that exits while its stdin still flows: never read, write the
    last output, close (with the client's bytes unread).
    """
    for chunk in pattern(conf.get("seed", 0), conf["size"]):
        conn.sendall(chunk)
    emit(event="sent", bytes=conf["size"])


def _counterLines(data, expected):
    """
    Check the counter lines in C{data} (whole lines) follow on from
    C{expected}: the next expected number, or raise.
    """
    for line in data.splitlines():
        if int(line) != expected:
            raise AssertionError("counter went from %d to %s" % (expected - 1, line))
        expected += 1
    return expected


def _serveCounter(conn, conf):
    """
    Stream a counter, a line of 8 digits every C{pause} seconds, C{count}
    lines in all, then half-close; at the same time read back what the
    client echoes, which must be the same counter, to its EOF.  Progress
    goes out every 100 lines, and the echo's check at the end.
    """

    def echoed():
        expected, rest, total = 0, b"", 0
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                total += len(data)
                lines, _, rest = (rest + data).rpartition(b"\n")
                expected = _counterLines(lines, expected)
            emit(event="echoed", lines=expected, bytes=total, rest=len(rest), error=None)
        except Exception as e:
            emit(event="echoed", lines=expected, bytes=total, rest=len(rest), error=repr(e))

    reader = threading.Thread(target=echoed)
    reader.start()
    for n in range(conf["count"]):
        conn.sendall(b"%08d\n" % n)
        if n % 100 == 99:
            emit(event="sent", lines=n + 1)
        time.sleep(conf.get("pause", 0.001))
    conn.shutdown(socket.SHUT_WR)
    reader.join()


_MODES = {
    "lastWords": _serveLastWords,
    "counter": _serveCounter,
    "http": _serveHttp,
    "echo": _serveEcho,
    "record": _serveRecord,
    "countThenReply": _serveCountThenReply,
    "greetThenCount": _serveGreetThenCount,
    "source": _serveSource,
}


def _handle(serve, conn, conf):
    try:
        serve(conn, conf)
    except Exception as e:
        emit(event="error", error=errorName(e), detail=repr(e))
    finally:
        conn.close()


def _fillBacklog(path):
    """
    Connect to our own listen(0) socket until the kernel says EAGAIN, so the
    router's connect can neither complete nor fail: it has to time out.
    """
    held = []
    for _ in range(64):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            return held
        held.append(c)
    raise RuntimeError("backlog of %s never filled" % (path,))


def raiseNofile():
    """
    Lift our soft open-file limit to the hard one, for roles that hold
    thousands of sockets; return the new soft limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _acceptAll(sock):
    """
    Accept every connection waiting on a non-blocking listening socket, as
    non-blocking sockets.
    """
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        yield conn


def _selectEcho(sock):
    """
    An echo server for thousands of connections in one thread (a thread each
    would not scale): send back every byte, answer EOF with EOF, close when
    both directions are done.
    """
    import selectors

    selector = selectors.DefaultSelector()
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ, None)
    # Per connection: [bytes to send back, peer sent EOF].
    state = {}
    accepted = 0

    def update(conn):
        pending, eof = state[conn]
        if pending:
            events = selectors.EVENT_WRITE
        elif eof:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            drop(conn)
            return
        else:
            events = selectors.EVENT_READ
        selector.modify(conn, events, conn)

    def drop(conn):
        selector.unregister(conn)
        del state[conn]
        conn.close()

    while True:
        for key, events in selector.select():
            if key.data is None:
                for conn in _acceptAll(sock):
                    state[conn] = [b"", False]
                    selector.register(conn, selectors.EVENT_READ, conn)
                    accepted += 1
                    if accepted % 100 == 0:
                        emit(event="accepted", total=accepted)
                continue
            conn = key.data
            try:
                if events & selectors.EVENT_READ and not state[conn][0]:
                    data = conn.recv(CHUNK)
                    if data:
                        state[conn][0] = data
                    else:
                        state[conn][1] = True
                if events & selectors.EVENT_WRITE and state[conn][0]:
                    sent = conn.send(state[conn][0])
                    state[conn][0] = state[conn][0][sent:]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                drop(conn)
                continue
            update(conn)


def _selectFlood(sock):
    """
    A daemon that sends on every connection for ever, to thousands of
    readers that never read, in one thread and from one shared buffer: what
    piles up is then in the sockets (and in whatever relays them), not here.
    """
    import selectors

    selector = selectors.DefaultSelector()
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ, None)
    data = b"x" * CHUNK
    while True:
        for key, _ in selector.select():
            if key.data is None:
                for conn in _acceptAll(sock):
                    selector.register(conn, selectors.EVENT_WRITE, conn)
                continue
            try:
                key.data.send(data)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                selector.unregister(key.data)
                key.data.close()


# Modes that serve thousands of connections from one thread.
_SELECT_MODES = {"selectEcho": _selectEcho, "selectFlood": _selectFlood}


def backend(conf):
    """
    Listen at C{conf["path"]} as whoever we run as, then serve each connection
    in the chosen mode.  C{stale} binds and closes (a socket file nobody
    listens on); C{backlogFull} listens but never accepts.
    """
    path = conf["path"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if "chmod" in conf:
        os.chmod(path, conf["chmod"])
    mode = conf["mode"]
    if mode == "stale":
        sock.close()
        emit(event="ready", pid=os.getpid(), uid=os.getuid())
        return
    if mode == "backlogFull":
        sock.listen(0)
        held = _fillBacklog(path)
        emit(event="ready", pid=os.getpid(), uid=os.getuid(), held=len(held))
        sys.stdin.read()  # Until the harness goes away.
        return
    if mode in _SELECT_MODES:
        raiseNofile()
        sock.listen(conf.get("backlog", 4096))
        emit(event="ready", pid=os.getpid(), uid=os.getuid())
        _SELECT_MODES[mode](sock)
        return
    sock.listen(conf.get("backlog", 128))
    emit(event="ready", pid=os.getpid(), uid=os.getuid())
    serve = _MODES[mode]
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_handle, args=(serve, conn, conf), daemon=True).start()


# The agent: a client socket driven by the harness, one JSON command a line.


def exchange(socks, payload, timeout):
    """
    On every socket at once, in one select loop: send C{payload}, half-close,
    and read the answer to EOF (also when the send failed).  Answers are counted as C{"echo"} when they
    echo C{payload}, otherwise by their first line (C{""} for none), with a
    few samples of those.
    """
    import selectors

    selector = selectors.DefaultSelector()
    answers = {}
    errors = {}
    for sock in socks:
        sock.setblocking(False)
        try:
            sent = sock.send(payload)
            if sent != len(payload):
                raise RuntimeError("short send %d" % (sent,))
            sock.shutdown(socket.SHUT_WR)
        except Exception as e:
            # The router may have answered and closed already: read it anyway.
            errors["send:" + errorName(e)] = errors.get("send:" + errorName(e), 0) + 1
        answers[sock] = bytearray()
        selector.register(sock, selectors.EVENT_READ)
    done = {}
    samples = []
    deadline = time.monotonic() + timeout
    while answers and time.monotonic() < deadline:
        for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
            sock = key.fileobj
            try:
                more = sock.recv(65536)
            except BlockingIOError:
                continue
            except Exception as e:
                more = None
                errors["recv:" + errorName(e)] = errors.get("recv:" + errorName(e), 0) + 1
            if more:
                answers[sock] += more
                continue
            answer = bytes(answers.pop(sock))
            selector.unregister(sock)
            sock.close()
            if more is None:
                continue
            if answer == payload:
                kind = "echo"
            else:
                kind = answer.split(b"\r\n", 1)[0].decode("latin-1")
                if len(samples) < 3:
                    samples.append(answer[:300].decode("latin-1"))
            done[kind] = done.get(kind, 0) + 1
    unanswered = len(answers)
    for sock in answers:
        sock.close()
    return {"answers": done, "unanswered": unanswered, "errors": errors, "samples": samples}


def _connect(path, timeout):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


class Agent:
    """
    Holds at most one open client connection between commands, so a test can
    interleave its steps with signals to the router or the backend.
    """

    def __init__(self):
        self.sock = None

    def op_connect(self, path, timeout=60):
        self.sock = _connect(path, timeout)
        return {}

    def op_connectAndSend(self, path, data, shutdown=False, timeout=60):
        """
        Send the moment connect returns, before the router can have reached
        the backend: those bytes must not be lost.
        """
        self.sock = _connect(path, timeout)
        self.sock.sendall(_unb64(data))
        if shutdown:
            self.sock.shutdown(socket.SHUT_WR)
        return {}

    def op_send(self, data):
        try:
            self.sock.sendall(_unb64(data))
        except Exception as e:
            return {"error": errorName(e)}
        return {"error": None}

    def op_sendPattern(self, seed, size):
        return sendPattern(self.sock, seed, size)

    def op_shutdownWrite(self):
        self.sock.shutdown(socket.SHUT_WR)
        return {}

    def op_recvExact(self, size):
        data = bytearray()
        error = None
        try:
            while len(data) < size:
                more = self.sock.recv(size - len(data))
                if not more:
                    break
                data += more
        except Exception as e:
            error = errorName(e)
        return {"data": _b64(data), "error": error}

    def op_recvSlowly(self, size, chunk=4096, pause=0.002):
        """
        A slow reader: small reads with pauses (the pauses model slowness;
        nothing waits on them).
        """
        got = 0
        while got < size:
            data = self.sock.recv(min(chunk, size - got))
            if not data:
                break
            got += len(data)
            time.sleep(pause)
        return {"len": got}

    def op_sendWhileReading(self, path, chunk=4096, pause=0.001, timeout=30):
        """
        Connect, send for as long as the socket takes it (stdin still
        flowing) while reading slowly to the end; say what came and how
        each side ended.
        """
        sock = _connect(path, timeout)
        sending = {"sent": 0, "error": None}

        def sender():
            data = b"i" * 65536
            try:
                while True:
                    sending["sent"] += sock.send(data)
            except Exception as e:
                sending["error"] = errorName(e)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        digest = hashlib.sha256()
        got = 0
        error = None
        try:
            while True:
                data = sock.recv(chunk)
                if not data:
                    break
                digest.update(data)
                got += len(data)
                time.sleep(pause)
        except Exception as e:
            error = errorName(e)
        thread.join(timeout)
        sock.close()
        return {"len": got, "sha": digest.hexdigest(), "error": error, "sendError": sending["error"]}

    def op_recvAll(self, keep=65536, timeout=None):
        if timeout is not None:
            self.sock.settimeout(timeout)
        return recvAll(self.sock, keep)

    def op_close(self):
        self.sock.close()
        self.sock = None
        return {}

    def op_echoTransfer(self, seed, size):
        """
        Send and receive at the same time (an echo needs both), then half-close
        and read the rest.
        """
        result = {}

        def sender():
            result.update(sendPattern(self.sock, seed, size))
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except Exception as e:
                result["shutdownError"] = errorName(e)

        thread = threading.Thread(target=sender)
        thread.start()
        received = recvAll(self.sock, keep=0)
        thread.join()
        return {"sent": result, "received": received}

    def op_echoCounter(self):
        """
        Read the daemon's counter (see L{_serveCounter}), check it has no
        gap and no repeat, and send each whole line back as it comes; at
        its end, half-close.
        """
        expected, rest, total = 0, b"", 0
        error = None
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                total += len(data)
                lines, _, rest = (rest + data).rpartition(b"\n")
                if lines:
                    expected = _counterLines(lines, expected)
                    self.sock.sendall(lines + b"\n")
            self.sock.shutdown(socket.SHUT_WR)
        except Exception as e:
            error = repr(e)
        return {"lines": expected, "bytes": total, "rest": len(rest), "error": error}

    def op_raw(self, path, data, shutdown=False, keep=1 << 20, timeout=30):
        """
        One whole exchange on a fresh connection: the bytes as the wire
        carried them, and how the read ended.
        """
        started = time.monotonic()
        sock = _connect(path, timeout)
        try:
            sock.sendall(_unb64(data))
            if shutdown:
                sock.shutdown(socket.SHUT_WR)
            result = recvAll(sock, keep)
        finally:
            sock.close()
        result["elapsed"] = time.monotonic() - started
        return result

    def op_unshareUser(self):
        """
        Move into a new user namespace, owned by our uid (as a rootless
        container's runtime does); the harness writes its maps.
        """
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        return {"pid": os.getpid()}

    def op_setGroups(self, groups):
        """Set our supplementary groups (as a namespace's root may)."""
        os.setgroups(groups)
        return {"groups": os.getgroups()}

    def op_connectInChild(self, path):
        """
        Have a child connect, and keep the socket once the child has
        exited (the connection handed on, its connector's pid free): the
        child's pid.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        child = os.fork()
        if child == 0:
            try:
                sock.connect(path)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        if not hasattr(self, "held"):
            self.held = []
        self.held.append(sock)
        return {"pid": child}

    def op_requestHeld(self, data, timeout=30):
        """One whole exchange on the newest held connection, then closed."""
        sock = self.held.pop()
        sock.settimeout(timeout)
        try:
            sock.sendall(_unb64(data))
            sock.shutdown(socket.SHUT_WR)
            return recvAll(sock)
        finally:
            sock.close()

    def op_becomeIds(self, uid, gid):
        """Take a uid and gid of our (mapped) user namespace."""
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        return {"uid": os.getuid(), "gid": os.getgid()}

    def op_http(self, path, method, url, body=None, headers=None, timeout=30):
        """
        A real HTTP client (http.client) over the Unix socket; then read the
        raw socket to EOF to see whether the close was clean.
        """
        started = time.monotonic()
        sock = _connect(path, timeout)
        conn = http.client.HTTPConnection("docker", timeout=timeout)
        # http.client closes its own socket object when the response says
        # Connection: close; a duplicate keeps ours open for the EOF check.
        conn.sock = sock.dup()
        result = {"stage": "request"}
        try:
            conn.request(method, url, body=_unb64(body) if body else None, headers=headers or {})
            result["stage"] = "response"
            response = conn.getresponse()
            result.update(
                status=response.status,
                reason=response.reason,
                headers=[[k, v] for k, v in response.getheaders()],
            )
            result["stage"] = "body"
            result["body"] = _b64(response.read())
            result["stage"] = "eof"
            tail = recvAll(sock)
            result.update(tailLen=tail["len"], tailError=tail["error"])
            result["stage"] = "done"
        except Exception as e:
            result["error"] = errorName(e)
            result["detail"] = repr(e)
        finally:
            conn.close()
            sock.close()
        result["elapsed"] = time.monotonic() - started
        return result

    def op_requestLoop(self, path, data, count, timeout=30):
        """
        Many whole exchanges in a row; count the answers by status line and
        keep one sample of each, for the symlink race.
        """
        statuses = {}
        samples = {}
        errors = {}
        for _ in range(count):
            try:
                sock = _connect(path, timeout)
            except Exception as e:
                key = "connect:" + errorName(e)
                errors[key] = errors.get(key, 0) + 1
                continue
            try:
                sock.sendall(_unb64(data))
                sock.shutdown(socket.SHUT_WR)
                result = recvAll(sock, keep=65536)
            except Exception as e:
                result = {"error": errorName(e), "head": ""}
            finally:
                sock.close()
            if result["error"]:
                errors[result["error"]] = errors.get(result["error"], 0) + 1
            raw = _unb64(result["head"])
            status = raw.split(b"\r\n", 1)[0].decode("latin-1")
            statuses[status] = statuses.get(status, 0) + 1
            samples.setdefault(status, _b64(raw))
        return {"statuses": statuses, "samples": samples, "errors": errors}

    def op_dockerPing(self, path):
        """
        What the Docker SDK makes of the router's answer.
        """
        import docker

        client = docker.DockerClient(base_url="unix://" + path, version="1.43", timeout=30)
        try:
            client.ping()
        except docker.errors.APIError as e:
            return {"apiError": True, "status": e.status_code, "explanation": e.explanation}
        except Exception as e:
            return {"apiError": False, "error": errorName(e), "detail": repr(e)}
        return {"apiError": False, "error": None}

    # Many connections from one client, for the load and hardening tests.

    def op_holdMany(self, path, count, nonblocking=False, probe=True, timeout=60):
        """
        Open C{count} more connections and keep them open (blocking connects,
        or non-blocking ones as the docker CLI makes, counting each errno).
        With C{probe}, send one byte on each and read one back: an echo
        proves the connection was relayed, not just queued.
        """
        raiseNofile()
        if not hasattr(self, "held"):
            self.held = []
        connects = {}
        opened = []
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if nonblocking:
                sock.setblocking(False)
                code = sock.connect_ex(path)
                name = "ok" if code == 0 else errno.errorcode.get(code, str(code))
            else:
                sock.settimeout(timeout)
                try:
                    sock.connect(path)
                    name = "ok"
                except Exception as e:
                    name = errorName(e)
            connects[name] = connects.get(name, 0) + 1
            if name == "ok":
                opened.append(sock)
            else:
                sock.close()
        result = {"connects": connects, "echoed": 0, "replies": {}, "errors": {}}
        if probe:
            for sock in opened:
                sock.settimeout(timeout)
                try:
                    sock.sendall(b"x")
                except Exception as e:
                    name = "send:" + errorName(e)
                    result["errors"][name] = result["errors"].get(name, 0) + 1
            for sock in opened:
                try:
                    data = sock.recv(1)
                except Exception as e:
                    name = "recv:" + errorName(e)
                    result["errors"][name] = result["errors"].get(name, 0) + 1
                    continue
                if data == b"x":
                    result["echoed"] += 1
                else:
                    key = data.decode("latin-1") or "EOF"
                    result["replies"][key] = result["replies"].get(key, 0) + 1
        self.held.extend(opened)
        result["held"] = len(self.held)
        return result

    def op_closeHeld(self, count=None):
        """
        Close the newest C{count} held connections (all by default).
        """
        held = getattr(self, "held", [])
        count = len(held) if count is None else count
        for _ in range(count):
            held.pop().close()
        return {"held": len(held)}

    def op_latencyLoop(self, path, data, count, timeout=30, deadline=None):
        """
        C{count} whole exchanges in a row, each on a new connection, timed
        from before the connect to the answer's EOF; fewer when C{deadline}
        seconds have gone by (a router that stalls).
        """
        payload = _unb64(data)
        times = []
        statuses = {}
        errors = {}
        stop = None if deadline is None else time.monotonic() + deadline
        for _ in range(count):
            if stop is not None and time.monotonic() > stop:
                break
            started = time.perf_counter()
            try:
                sock = _connect(path, timeout)
                try:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    result = recvAll(sock, keep=200)
                finally:
                    sock.close()
            except Exception as e:
                result = {"error": errorName(e), "head": ""}
            times.append(time.perf_counter() - started)
            if result["error"]:
                errors[result["error"]] = errors.get(result["error"], 0) + 1
            status = _unb64(result["head"]).split(b"\r\n", 1)[0].decode("latin-1")
            statuses[status] = statuses.get(status, 0) + 1
        return {"times": times, "statuses": statuses, "errors": errors}

    def op_burst(self, path, count, data, timeout=60):
        """
        C{count} non-blocking connects at once (the docker CLI's way, where a
        full backlog is EAGAIN), then L{exchange} on each connection that got
        in.
        """
        raiseNofile()
        started = time.monotonic()
        socks = []
        connects = {}
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(path)
            name = "ok" if code == 0 else errno.errorcode.get(code, str(code))
            connects[name] = connects.get(name, 0) + 1
            if code == 0:
                socks.append(sock)
            else:
                sock.close()
        connected = time.monotonic()
        result = exchange(socks, _unb64(data), timeout)
        result.update(
            connects=connects,
            connectSeconds=connected - started,
            seconds=time.monotonic() - started,
        )
        return result

    def op_exchangeHeld(self, data, timeout=60):
        """
        L{exchange} on every held connection at once; they are closed after.
        """
        held, self.held = getattr(self, "held", []), []
        return exchange(held, _unb64(data), timeout)

    def op_scenario(self, path, steps, timeout=10):
        """
        One client's misbehaviour, step by step, on a fresh connection:
        C{send} bytes, C{shutdown} the write side, C{read} to EOF or
        C{readSome}, then C{close}, C{reset} (close with a RST) or C{hold}
        (keep it open until L{op_closeHeld}).  Failures are reported, not
        raised: a peer giving up is part of what is being tried.
        """
        sock = _connect(path, timeout)
        outcome = {"read": "", "errors": [], "eof": False}
        received = bytearray()
        ended = False
        for step in steps:
            action = step["do"]
            try:
                if action == "send":
                    sock.sendall(_unb64(step["data"]))
                elif action == "shutdown":
                    sock.shutdown(socket.SHUT_WR)
                elif action == "read":
                    sock.settimeout(step.get("timeout", timeout))
                    while True:
                        more = sock.recv(65536)
                        if not more:
                            outcome["eof"] = True
                            break
                        received += more
                elif action == "readSome":
                    sock.settimeout(step.get("timeout", timeout))
                    more = sock.recv(step["max"])
                    if not more:
                        outcome["eof"] = True
                    received += more
                elif action == "reset":
                    import struct

                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                    ended = True
                elif action == "close":
                    sock.close()
                    ended = True
                elif action == "hold":
                    if not hasattr(self, "held"):
                        self.held = []
                    self.held.append(sock)
                    ended = True
            except Exception as e:
                outcome["errors"].append("%s:%s" % (action, errorName(e)))
            if ended:
                break
        if not ended:
            sock.close()
        outcome["read"] = _b64(received)
        return outcome


def echoLoop(conf):
    """
    A long-lived client: one connection to an echo daemon, round trip after
    round trip of random bytes, each checked, progress reported as it goes.
    Exits (with an event saying why) at the first wrong or missing byte.
    """
    rng = random.Random(conf.get("seed", 0))
    sock = _connect(conf["path"], 30)
    ok = 0
    while True:
        payload = rng.randbytes(rng.randint(1, conf.get("maxSize", 16384)))
        try:
            sock.sendall(payload)
            echoed = bytearray()
            while len(echoed) < len(payload):
                more = sock.recv(len(payload) - len(echoed))
                if not more:
                    break
                echoed += more
        except Exception as e:
            emit(event="failed", ok=ok, error=errorName(e), detail=repr(e))
            return
        if echoed != payload:
            emit(event="failed", ok=ok, error="mismatch", sent=len(payload), got=len(echoed))
            return
        ok += 1
        if ok == 1:
            emit(event="ready", pid=os.getpid(), uid=os.getuid())
        if ok % 20 == 0:
            emit(event="progress", ok=ok)
        # Pacing, so two cores are left for the router and the test.
        time.sleep(conf.get("pause", 0.002))


def agent(conf):
    emit(event="ready", pid=os.getpid(), uid=os.getuid())
    target = Agent()
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        command = json.loads(line)
        op = getattr(target, "op_" + command.pop("op"))
        try:
            result = op(**command)
        except Exception as e:
            result = {"exception": errorName(e), "detail": repr(e)}
        emit(event="reply", **result)


def flipper(conf):
    """
    Swap a symlink between two targets as fast as we can, atomically (rename),
    so that every lookup finds one target or the other, never nothing.
    """
    link = conf["link"]
    targets = conf["targets"]
    temporary = link + ".flip"
    flips = 0
    while True:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        os.symlink(targets[flips % 2], temporary)
        os.rename(temporary, link)
        flips += 1
        if flips == 2:
            emit(event="ready", pid=os.getpid(), uid=os.getuid())


def exchanger(conf):
    """
    Swap two names in one directory as fast as we can, atomically
    (renameat2 with RENAME_EXCHANGE): a symbolic link and a plain file
    trade places, so a walk may meet a link at lstat and a file at
    readlink.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    first, second = (os.fsencode(p) for p in conf["paths"])
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    swaps = 0
    while True:
        if libc.renameat2(AT_FDCWD, first, AT_FDCWD, second, RENAME_EXCHANGE) != 0:
            raise OSError(ctypes.get_errno(), "renameat2(RENAME_EXCHANGE)")
        swaps += 1
        if swaps == 2:
            emit(event="ready", pid=os.getpid(), uid=os.getuid())


def trickler(conf):
    """
    Open C{count} connections to C{path} and send one byte of a request
    head on each every C{interval} seconds, never finishing it; report how
    many the server has closed so far each round.
    """
    raiseNofile()
    socks = []
    for _ in range(conf["count"]):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(conf["path"])
        sock.setblocking(False)
        socks.append(sock)
    emit(event="ready", pid=os.getpid(), uid=os.getuid())
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 10000
    sent = 0
    closed = set()
    while True:
        for sock in socks:
            if sock in closed:
                continue
            try:
                if sock.recv(1024) == b"":
                    closed.add(sock)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed.add(sock)
                continue
            try:
                sock.send(head[sent:sent + 1])
            except OSError:
                closed.add(sock)
        sent += 1
        emit(event="progress", sent=sent, closed=len(closed), opened=len(socks))
        time.sleep(conf["interval"])


_ROLES = {
    "backend": backend,
    "agent": agent,
    "flipper": flipper,
    "echoLoop": echoLoop,
    "exchanger": exchanger,
    "trickler": trickler,
}


if __name__ == "__main__":
    _conf = json.loads(sys.argv[1])
    _ROLES[_conf.pop("role")](_conf)
