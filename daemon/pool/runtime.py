"""Runtime worker: Lambda's Runtime API for a `bootstrap` written in any language.

A function with `runtime = "provided"` (its own executable `bootstrap`) or `runtime = "nodejs"`
(lambdaemon's Node.js bootstrap, daemon/pool/node/bootstrap.mjs) runs as one of these. The pool
starts it exactly as it starts a Python worker (process.start_process: clean environment, own
process group, fd 1 and 2 on the capture memfd, the control socket), as
``python -m daemon.pool.runtime <control fd> <daemon pid> <init timeout s> <bootstrap argv...>``,
and talks to it with the same frames (protocol.py). So slots, deadlines, the timeout's kill of
the whole process tree, log capture, recycling and records are the pool's, as for Python.

This process listens on a loopback port of its own (AWS_LAMBDA_RUNTIME_API), starts the
bootstrap as its child with Lambda's environment, and bridges:

- the bootstrap's first `GET /runtime/invocation/next` ends its init: `Ready` goes to the pool
  (a `POST /runtime/init/error` first: `InitFailed`; no `next` within the init timeout, which
  is the function's timeout_s: `InitFailed` with Sandbox.Timedout and a message saying so);
- each `Invoke` from the pool answers the waiting `next` (Lambda's headers, the event as body);
- `POST /runtime/invocation/{id}/response` or `/error` for the current id becomes the `Result`.

What a runtime client gets wrong is answered as Lambda answers it and touches no other call: an
id that is not the current invocation's gets 400 InvalidRequestID (one that was answered
already: 403 InvalidStateTransition), a body over Lambda's 6 MB limit gets 413
RequestEntityTooLarge and its invocation fails with Function.ResponseSizeTooLarge. A response
after the deadline cannot happen: the pool kills this process and the bootstrap at the deadline.

The bootstrap's memory is checked while an invocation runs (its resident set against
memory_mb: a runtime's virtual reservations, V8's or Go's, make an address-space limit
useless), its peak is metered per invocation, and when it exits, this process exits with the
same status, so the pool records the crash (`crashed`, Runtime.ExitError) as for Python.

Only the standard library is imported here, as in worker.py.
"""

from __future__ import annotations

import binascii
import errno
import json
import os
import select
import signal
import socket
import sys
import time

from daemon.pool.protocol import (
    DEPS_ENV,
    MAX_RESPONSE_BYTES,
    InitFailed,
    Invoke,
    Ready,
    Result,
    WorkerChannel,
)
from daemon.pool.worker import _die_with_daemon, _hide_channel, _yield_to_the_daemon

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PREFIX = b"/2018-06-01/runtime/"
NEXT = PREFIX + b"invocation/next"
INVOCATION = PREFIX + b"invocation/"
MAX_HEADER_BYTES = 64 * 1024
MEMORY_CHECK_S = 0.05  # how often the bootstrap's resident memory is read during a call
RECENT_IDS = 64  # answered invocation ids remembered, to tell "answered already" from "unknown"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _api_error(error_type: str, message: str) -> bytes:
    return _json({"errorMessage": message, "errorType": error_type})


class _Connection:
    __slots__ = ("sock", "buffer", "closing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.closing = False


class _Request:
    __slots__ = ("method", "path", "headers", "body", "too_large")

    def __init__(self, method: str, path: bytes, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.too_large = False


class RuntimeApi:
    """The Runtime API of one bootstrap, and the bridge to the pool's control channel."""

    def __init__(self, control_fd: int, argv: list[str], init_timeout_s: float) -> None:
        self.control = WorkerChannel(control_fd)
        self.control_fd = control_fd
        self.argv = argv
        self.poll = select.epoll()
        self.connections: dict[int, _Connection] = {}  # by descriptor
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.memory_kb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")) * 1024
        self.started = time.perf_counter()
        self.init_deadline = time.monotonic() + init_timeout_s
        self.init_timeout_s = init_timeout_s
        self.ready = False
        self.waiting: _Connection | None = None  # a `next` not yet answered
        self.pending: Invoke | None = None  # an invocation the bootstrap has not asked for yet
        self.current: Invoke | None = None  # the invocation the bootstrap is running
        self.memory_due = 0.0  # when the running invocation's memory is checked next
        self.answered: list[str] = []
        self.child = -1
        self.status_fd = -1
        self.clear_refs_fd = -1

    # --- the bootstrap ------------------------------------------------------------------------

    def spawn(self) -> int:
        env = dict(os.environ)
        # PYTHONPATH carried this tree for this process only; the function's own entries stay.
        entries = env.pop("PYTHONPATH", "").split(os.pathsep)
        if entries and entries[0] == _ROOT:
            del entries[0]
        if any(entries):
            env["PYTHONPATH"] = os.pathsep.join(entries)
        env.pop(DEPS_ENV, None)
        host, port = self.listener.getsockname()
        env["AWS_LAMBDA_RUNTIME_API"] = f"{host}:{port}"
        self.child = os.posix_spawn(self.argv[0], self.argv, env)
        try:
            self.status_fd = os.open(f"/proc/{self.child}/status", os.O_RDONLY | os.O_CLOEXEC)
            self.clear_refs_fd = os.open(
                f"/proc/{self.child}/clear_refs", os.O_WRONLY | os.O_CLOEXEC
            )
        except OSError:
            pass  # gone already, or no /proc: its exit is seen below; metering is then absent
        return os.pidfd_open(self.child)

    def _memory(self) -> tuple[int | None, int | None]:
        """The bootstrap's peak resident memory since the last reset, and its resident memory."""
        if self.status_fd < 0:
            return None, None
        try:
            status = os.pread(self.status_fd, 8192, 0)
        except OSError:
            return None, None
        return _field_kb(status, b"VmHWM:"), _field_kb(status, b"VmRSS:")

    def _reset_peak(self) -> None:
        if self.clear_refs_fd >= 0:
            try:
                os.write(self.clear_refs_fd, b"5")
            except OSError:
                pass

    def exit_like_child(self) -> None:
        """Exit with the bootstrap's exit status (a signal by the same signal)."""
        _, status = os.waitpid(self.child, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            code = 128 - code
        os._exit(code)

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        pidfd = self.spawn()
        # epoll itself rather than `selectors`: its bookkeeping (a key object and a tuple per
        # ready descriptor) was a fair share of this process's time per invocation.
        poll = self.poll
        listener_fd = self.listener.fileno()
        poll.register(listener_fd, select.EPOLLIN)
        poll.register(pidfd, select.EPOLLIN)
        poll.register(self.control_fd, select.EPOLLIN)
        connections = self.connections
        while True:
            timeout = -1.0
            if not self.ready:
                timeout = max(0.0, self.init_deadline - time.monotonic())
            elif self.current is not None:
                timeout = max(0.0, self.memory_due - time.monotonic())
            for fd, _ in poll.poll(timeout):
                conn = connections.get(fd)
                if conn is not None:
                    self._readable(conn)
                elif fd == self.control_fd:
                    self._from_pool()
                elif fd == listener_fd:
                    self._accept()
                elif fd == pidfd:
                    self.exit_like_child()
            if not self.ready:
                if time.monotonic() >= self.init_deadline:
                    self._init_timed_out()
            elif self.current is not None and time.monotonic() >= self.memory_due:
                self._check_memory()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections[sock.fileno()] = _Connection(sock)
        self.poll.register(sock.fileno(), select.EPOLLIN)

    def _from_pool(self) -> None:
        invoke = self.control.receive()
        if invoke is None:  # the pool is done with this worker
            self._end()
        self.pending = invoke
        if self.waiting is not None:
            self._deliver()

    def _end(self) -> None:
        try:
            os.kill(self.child, signal.SIGKILL)
        except OSError:
            pass
        os._exit(0)

    def _readable(self, conn: _Connection) -> None:
        try:
            # 64 KiB, as WorkerChannel reads: a larger request is served by mmap, an mremap and
            # a munmap on every call for a bytes object that shrinks to a few hundred bytes.
            data = conn.sock.recv(64 * 1024)
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        while not conn.closing and conn is not self.waiting:
            request = _parse(conn)
            if request is None:
                break
            self._handle(conn, request)
        if conn.closing:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if self.waiting is conn:
            self.waiting = None
        fd = conn.sock.fileno()
        if self.connections.get(fd) is conn:
            del self.connections[fd]
            self.poll.unregister(fd)
        conn.sock.close()

    # --- the API ------------------------------------------------------------------------------

    def _handle(self, conn: _Connection, request: _Request) -> None:
        path = request.path
        if request.too_large:
            current = self.current
            if current is not None and path.startswith(
                INVOCATION + current.invocation_id.encode() + b"/"
            ):
                self._finish_too_large()
            message = f"Exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."
            self._send(conn, 413, _api_error("RequestEntityTooLarge", message))
            return
        if path == NEXT and request.method == "GET":
            self._next(conn)
        elif path == PREFIX + b"init/error" and request.method == "POST":
            self._init_error(conn, request)
        elif path.startswith(INVOCATION) and request.method == "POST":
            request_id, _, verb = path[len(INVOCATION) :].decode("utf-8", "replace").rpartition("/")
            if verb not in ("response", "error"):
                self._send(conn, 404, _api_error("NotFound", "No such route"))
                return
            self._post(conn, request, request_id, verb)
        elif path == b"/2018-06-01/ping" or path == b"/ping":
            self._send(conn, 200, b"pong")
        else:
            self._send(conn, 404, _api_error("NotFound", "No such route"))

    def _next(self, conn: _Connection) -> None:
        if self.current is not None or self.waiting is not None:
            message = "Runtime asked for the next invocation before answering the current one"
            if self.current is None:
                message = "Another request is already waiting for the next invocation"
            self._send(conn, 403, _api_error("InvalidStateTransition", message))
            return
        if not self.ready:
            self.ready = True
            self.control.send(Ready((time.perf_counter() - self.started) * 1000))
        self.waiting = conn
        if self.pending is not None:
            self._deliver()

    def _deliver(self) -> None:
        conn, invoke = self.waiting, self.pending
        assert conn is not None and invoke is not None
        self.waiting, self.pending, self.current = None, None, invoke
        self.memory_due = time.monotonic() + MEMORY_CHECK_S
        self._reset_peak()
        event = invoke.event or b"{}"
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Lambda-Runtime-Aws-Request-Id: {invoke.invocation_id}\r\n"
            f"Lambda-Runtime-Deadline-Ms: {invoke.deadline_ms}\r\n"
            f"Lambda-Runtime-Invoked-Function-Arn: {invoke.invoked_arn}\r\n"
            f"Lambda-Runtime-Trace-Id: {_trace_id()}\r\n"
        )
        if invoke.client_context:
            try:
                context = binascii.a2b_base64(invoke.client_context).decode()
            except (ValueError, UnicodeDecodeError):
                context = ""
            if context and "\r" not in context and "\n" not in context:
                head += f"Lambda-Runtime-Client-Context: {context}\r\n"
        head += f"Content-Length: {len(event)}\r\n\r\n"
        self._send_raw(conn, head.encode("utf-8", "replace") + event)
        # What the connection sent after its `next` (pipelined) is read now.
        while not conn.closing and conn is not self.waiting:
            request = _parse(conn)
            if request is None:
                break
            self._handle(conn, request)

    def _post(self, conn: _Connection, request: _Request, request_id: str, verb: str) -> None:
        current = self.current
        if current is None or request_id != current.invocation_id:
            if request_id in self.answered:
                error_type, message = "InvalidStateTransition", "Invocation already answered"
                self._send(conn, 403, _api_error(error_type, f"{message}: {request_id}"))
            else:
                message = f"Invalid request ID: {request_id}"
                self._send(conn, 400, _api_error("InvalidRequestID", message))
            return
        peak_kb, rss_kb = self._memory()
        if verb == "response":
            result = Result(True, request.body, None, None, peak_kb, False, rss_kb)
        else:
            error_type, message = _error_fields(request)
            result = Result(False, request.body, error_type, message, peak_kb, False, rss_kb)
        self._finish(result)  # first: the caller's answer is what waits on this
        self._send_raw(conn, _ACCEPTED)

    def _finish(self, result: Result) -> None:
        current = self.current
        assert current is not None
        self.current = None
        self.answered.append(current.invocation_id)
        del self.answered[:-RECENT_IDS]
        try:
            result.quiet = os.fstat(1).st_size == 0
        except OSError:
            pass
        self.control.send(result)
        if result.retire:
            self._end()

    def _finish_too_large(self) -> None:
        error_type = "Function.ResponseSizeTooLarge"
        message = (
            f"Response payload size exceeded maximum allowed payload size "
            f"({MAX_RESPONSE_BYTES} bytes)."
        )
        peak_kb, rss_kb = self._memory()
        body = _json({"errorMessage": message, "errorType": error_type})
        self._finish(Result(False, body, error_type, message, peak_kb, False, rss_kb))

    def _init_error(self, conn: _Connection, request: _Request) -> None:
        if self.ready:
            message = "init/error after the runtime asked for an invocation"
            self._send(conn, 403, _api_error("InvalidStateTransition", message))
            return
        self._send_raw(conn, _ACCEPTED)
        error_type, message = _error_fields(request)
        payload = request.body if _is_json_object(request.body) else b""
        if not payload:
            payload = _json({"errorMessage": message, "errorType": error_type})
        init_ms = (time.perf_counter() - self.started) * 1000
        self.control.send(InitFailed(error_type, message, payload, init_ms))
        self._end()

    def _init_timed_out(self) -> None:
        message = (
            f"Init timed out after {self.init_timeout_s:.2f} seconds: the bootstrap "
            f"{self.argv[-1] if len(self.argv) > 1 else self.argv[0]} never asked for an "
            "invocation (GET /2018-06-01/runtime/invocation/next on AWS_LAMBDA_RUNTIME_API)"
        )
        payload = _json({"errorMessage": message, "errorType": "Sandbox.Timedout"})
        init_ms = (time.perf_counter() - self.started) * 1000
        self.control.send(InitFailed("Sandbox.Timedout", message, payload, init_ms))
        self._end()

    def _check_memory(self) -> None:
        self.memory_due = time.monotonic() + MEMORY_CHECK_S
        _, rss_kb = self._memory()
        if rss_kb is None or rss_kb <= self.memory_kb:
            return
        try:
            os.kill(self.child, signal.SIGKILL)
        except OSError:
            pass
        current = self.current
        assert current is not None
        limit = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "?")
        message = (
            f"RequestId: {current.invocation_id} Error: the runtime exceeded the memory limit "
            f"of {limit} MB"
        )
        os.write(1, f"[ERROR] Runtime.OutOfMemory: {message}\n".encode())
        body = _json({"errorType": "Runtime.OutOfMemory", "errorMessage": message})
        result = Result(False, body, "Runtime.OutOfMemory", message, rss_kb, True, rss_kb)
        self._finish(result)

    def _send(
        self,
        conn: _Connection,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}"]
        if headers is None:
            head.append("Content-Type: application/json")
        else:
            head.extend(f"{name}: {value}" for name, value in headers)
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        self._send_raw(conn, "\r\n".join(head).encode("utf-8", "replace") + body)

    def _send_raw(self, conn: _Connection, data: bytes) -> None:
        try:
            conn.sock.sendall(data)
        except OSError:
            conn.closing = True
        if conn.closing:
            self._close(conn)


_ACCEPTED = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
    b'{"status":"OK"}'
)
_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Request Entity Too Large",
    431: "Request Header Fields Too Large",
}


def _field_kb(status: bytes, field: bytes) -> int | None:
    start = status.find(field)
    if start < 0:
        return None
    start += len(field)
    return int(status[start : status.index(b"kB", start)])


def _trace_id() -> str:
    random = os.urandom(20).hex()
    return f"Root=1-{int(time.time()):08x}-{random[:24]};Parent={random[24:]};Sampled=0"


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def _error_fields(request: _Request) -> tuple[str, str]:
    """An /error or /init/error's type (the header, else the body's errorType) and message."""
    error_type = request.headers.get("lambda-runtime-function-error-type", "")
    message = ""
    try:
        body = json.loads(request.body) if request.body else None
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        if not error_type and isinstance(body.get("errorType"), str):
            error_type = body["errorType"]
        if isinstance(body.get("errorMessage"), str):
            message = body["errorMessage"]
    return error_type or "Runtime.Unknown", message


def _parse(conn: _Connection) -> _Request | None:
    """The next whole request in the connection's buffer (reading on, blocking, for a body
    that is still arriving); None until its head is in."""
    buffer = conn.buffer
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEADER_BYTES:
            _refuse(conn, 431, "RequestHeaderFieldsTooLarge", "Request headers too large")
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    try:
        method, target, _ = lines[0].split(" ", 2)
    except ValueError:
        _refuse(conn, 400, "BadRequest", "Malformed request line")
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    path = target.split("?", 1)[0].encode("latin-1")
    request = _Request(method, path, headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        try:
            body = _read_chunked(conn)
        except ValueError:
            _refuse(conn, 400, "BadRequest", "Malformed chunked body")
            return None
        if conn.closing:  # it ended in the middle of the body
            return None
        if body is None:
            request.too_large = True
        else:
            request.body = body
        return request
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        _refuse(conn, 400, "BadRequest", "Malformed Content-Length")
        return None
    if length > MAX_RESPONSE_BYTES:
        # Read and dropped (never held), then answered 413: a client that sends its whole body
        # before reading the answer, as most do, gets the answer instead of a broken pipe.
        request.too_large = True
        return request if _discard(conn, length) else None
    if not _fill(conn, length):
        return None
    request.body = bytes(buffer[:length])
    del buffer[:length]
    return request


def _fill(conn: _Connection, size: int) -> bool:
    """Read until the buffer holds `size` bytes; False (connection closed) if it ends first."""
    while len(conn.buffer) < size:
        try:
            chunk = conn.sock.recv(max(size - len(conn.buffer), 64 * 1024))
        except OSError:
            chunk = b""
        if not chunk:
            conn.closing = True
            return False
        conn.buffer += chunk
    return True


def _read_chunked(conn: _Connection) -> bytes | None:
    """A chunked body; None when it is over MAX_RESPONSE_BYTES (the rest is read and dropped)."""
    body = bytearray()
    too_large = False
    while True:
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if not _fill(conn, len(conn.buffer) + 1):
                return bytes(body)
        size = int(bytes(conn.buffer[:end]).split(b";")[0] or b"0", 16)
        del conn.buffer[: end + 2]
        if size == 0:  # trailers, then the blank line
            while (end := conn.buffer.find(b"\r\n")) != 0:
                if end > 0:
                    del conn.buffer[: end + 2]
                elif not _fill(conn, len(conn.buffer) + 1):
                    break
            del conn.buffer[:2]
            return None if too_large else bytes(body)
        if len(body) + size > MAX_RESPONSE_BYTES:
            too_large = True
        if too_large:
            if not _discard(conn, size + 2):
                return None
            continue
        if not _fill(conn, size + 2):
            return bytes(body)
        body += conn.buffer[:size]
        del conn.buffer[: size + 2]


def _discard(conn: _Connection, size: int) -> bool:
    """Read `size` bytes past what is buffered and drop them; False if the connection ends."""
    if len(conn.buffer) >= size:
        del conn.buffer[:size]
        return True
    size -= len(conn.buffer)
    conn.buffer.clear()
    while size > 0:
        try:
            chunk = conn.sock.recv(min(size, 256 * 1024))
        except OSError:
            chunk = b""
        if not chunk:
            conn.closing = True
            return False
        size -= len(chunk)
    return True


def _refuse(conn: _Connection, status: int, error_type: str, message: str) -> None:
    conn.closing = True
    body = _api_error(error_type, message)
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "Connection: close\r\n\r\n"
    try:
        conn.sock.sendall(head.encode() + body)
    except OSError:
        pass


def main() -> None:
    fd, daemon_pid, init_timeout_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    argv = sys.argv[4:]
    del sys.argv[1:]
    _die_with_daemon(daemon_pid)
    _yield_to_the_daemon()
    api = RuntimeApi(_hide_channel(fd), argv, init_timeout_s)
    try:
        api.run()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC) and api.child < 0:
            # The bootstrap could not be started: an init failure naming it.
            message = f"Cannot start the bootstrap {argv[0]}: {exc.strerror}"
            payload = _json({"errorMessage": message, "errorType": "Runtime.InvalidEntrypoint"})
            init_ms = (time.perf_counter() - api.started) * 1000
            api.control.send(InitFailed("Runtime.InvalidEntrypoint", message, payload, init_ms))
            os._exit(1)
        raise


if __name__ == "__main__":
    main()
