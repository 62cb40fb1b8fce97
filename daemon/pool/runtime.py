"""Lambda's Runtime API for a `bootstrap` written in any language.

A function with `runtime = "provided"` (its own executable `bootstrap`) or `runtime = "nodejs"`
(lambdaemon's Node.js bootstrap, daemon/pool/node/bootstrap.mjs) runs its bootstrap as a worker
of the pool, started through process.start_process like a Python worker (clean environment, own
process group, fd 1 and 2 on the capture memfd), so slots, deadlines, the timeout's kill of the
whole process tree, log capture, recycling and records are the pool's, as for Python.

`RuntimeApi` is the API itself, with no I/O of its own: it takes the bootstrap's HTTP requests
(parsed by `RequestReader`) and the pool's invocations, and answers each through its driver's
hooks. It has two drivers:

- the daemon's own loop (runtime_channel.py), when the bootstrap can reach the daemon's loopback:
  the pool listens on a port of its own for each worker and starts the bootstrap directly, through
  ``python -m daemon.pool.runtime --exec <fd> <daemon pid> <bootstrap argv...>`` (`exec_bootstrap`:
  the parent-death signal, then the bootstrap in its place);
- `Bridge`, a process of its own, when it cannot (a sandbox with `network = false`, whose
  loopback is its own): ``python -m daemon.pool.runtime <control fd> <daemon pid> <init timeout
  s> <bootstrap argv...>`` listens on a loopback port in the sandbox, starts the bootstrap as its
  child, and talks to the pool with the Python worker's frames (protocol.py).

In both, AWS_LAMBDA_RUNTIME_API names the port, and:

- the bootstrap's first `GET /runtime/invocation/next` ends its init: `Ready` goes to the pool
  (a `POST /runtime/init/error` first: `InitFailed`; no `next` within the init timeout, which
  is the function's timeout_s: `InitFailed` with Sandbox.Timedout and a message saying so);
- each `Invoke` from the pool answers the waiting `next` (Lambda's headers, the event as body);
- `POST /runtime/invocation/{id}/response` or `/error` for the current id becomes the `Result`.

What a runtime client gets wrong is answered as Lambda answers it and touches no other call: an
id that is not the current invocation's gets 400 InvalidRequestID (one that was answered
already: 403 InvalidStateTransition), a body over Lambda's 6 MB limit gets 413
RequestEntityTooLarge and its invocation fails with Function.ResponseSizeTooLarge. A response
after the deadline cannot happen: the pool kills the bootstrap at the deadline.

The bootstrap's memory is checked while an invocation runs (its resident set against
memory_mb: a runtime's virtual reservations, V8's or Go's, make an address-space limit
useless) and its peak is metered per invocation. Its exit is its worker's: the bridge exits with
the bootstrap's status, so the pool records a crash (`crashed`, Runtime.ExitError) as for Python.

Only the standard library is imported here, as in worker.py.
"""

from __future__ import annotations

import binascii
import errno
import json
import os
import re
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
INIT_ERROR = PREFIX + b"init/error"
MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4096  # a chunk's size line, or a trailer line
MEMORY_CHECK_S = 0.05  # how often the bootstrap's resident memory is read during a call
RECENT_IDS = 64  # answered invocation ids remembered, to tell "answered already" from "unknown"
READ_BYTES = 64 * 1024  # per read: glibc serves larger buffers with mmap, on every read
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _api_error(error_type: str, message: str) -> bytes:
    return _json({"errorMessage": message, "errorType": error_type})


# --- HTTP/1.1 requests, read as they arrive ------------------------------------------------------


class Request:
    __slots__ = ("method", "path", "headers", "body", "too_large")

    def __init__(self, method: str, path: bytes, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = b""
        self.too_large = False  # its body was over MAX_RESPONSE_BYTES: read and dropped


class RequestReader:
    """The requests on one connection, from its bytes as they come (`feed`).

    A body over MAX_RESPONSE_BYTES is read and dropped as it arrives, never held, and its request
    comes out (`too_large`) once the whole of it is in: a client that sends its whole body
    before reading the answer, as most do, gets the 413 instead of a broken pipe. Headers over
    64 KB, a malformed request line, Content-Length or chunk set `refusal` (status, errorType,
    message): the connection is answered with it and closed.
    """

    __slots__ = ("buffer", "request", "body", "left", "state", "refusal")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.request: Request | None = None  # the one whose body is being read
        self.body = bytearray()  # a chunked body so far
        self.left = 0  # bytes still to come of the body, or of the current chunk
        self.state = _HEAD
        self.refusal: tuple[int, str, str] | None = None

    def feed(self, data: bytes) -> list[Request]:
        if self.refusal is not None:
            return []
        buffer = self.buffer
        if not buffer and self.state == _HEAD and (request := self._whole(data)) is not None:
            return [request]  # the usual case: one small request in one read
        buffer += data
        done: list[Request] = []
        while self.refusal is None and self._step(done):
            pass
        return done

    def _whole(self, data: bytes) -> Request | None:
        """`data` as one request with a Content-Length body and nothing after it; else None."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        request = _head(data[:end])
        if request is None or "transfer-encoding" in request.headers:
            return None
        try:
            length = int(request.headers.get("content-length", "0"))
        except ValueError:
            return None
        if end + 4 + length != len(data) or length < 0:
            return None
        request.body = data[end + 4 :]
        return request

    def _step(self, done: list[Request]) -> bool:
        """Take what the buffer allows of the current state; False when it needs more bytes."""
        buffer, state = self.buffer, self.state
        if state == _HEAD:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    self.refusal = (431, "RequestHeaderFieldsTooLarge", "Request headers too large")
                return False
            request = _head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if request is None:
                self.refusal = (400, "BadRequest", "Malformed request line")
                return False
            self.request = request
            if "chunked" in request.headers.get("transfer-encoding", "").lower():
                self.body.clear()
                self.state = _CHUNK_SIZE
                return True
            try:
                length = int(request.headers.get("content-length", "0"))
            except ValueError:
                length = -1
            if length < 0:
                self.refusal = (400, "BadRequest", "Malformed Content-Length")
                return False
            request.too_large = length > MAX_RESPONSE_BYTES
            self.left = length
            self.state = _BODY
            return True
        request = self.request
        assert request is not None
        if state == _BODY:
            if request.too_large:
                dropped = min(self.left, len(buffer))
                del buffer[:dropped]
                self.left -= dropped
            elif len(buffer) >= self.left:
                request.body = bytes(buffer[: self.left])
                del buffer[: self.left]
                self.left = 0
            if self.left:
                return False
            return self._done(done)
        if state == _CHUNK_SIZE or state == _TRAILERS:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_CHUNK_LINE_BYTES:
                    self.refusal = (400, "BadRequest", "Malformed chunked body")
                return False
            line = bytes(buffer[:end])
            del buffer[: end + 2]
            if state == _TRAILERS:
                if not line:  # the blank line that ends the body
                    if not request.too_large:
                        request.body = bytes(self.body)
                    self.body.clear()
                    return self._done(done)
                return True  # a trailer: ignored
            try:
                size = int(line.split(b";")[0] or b"0", 16)
            except ValueError:
                size = -1
            if size < 0:
                self.refusal = (400, "BadRequest", "Malformed chunked body")
                return False
            if size == 0:
                self.state = _TRAILERS
            else:
                if len(self.body) + size > MAX_RESPONSE_BYTES:
                    request.too_large = True
                    self.body.clear()
                self.left = size + 2  # the chunk and its CRLF
                self.state = _CHUNK_DATA
            return True
        # _CHUNK_DATA
        take = min(self.left, len(buffer))
        if not take:
            return False
        if not request.too_large:
            self.body += buffer[: min(take, max(0, self.left - 2))]  # never the chunk's CRLF
        del buffer[:take]
        self.left -= take
        if self.left:
            return False
        self.state = _CHUNK_SIZE
        return True

    def _done(self, done: list[Request]) -> bool:
        assert self.request is not None
        done.append(self.request)
        self.request = None
        self.state = _HEAD
        return True


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS = range(5)


# The headers the API reads; the others are skipped, as a request's head is read on every call.
_HEADERS = re.compile(
    rb"\r\n(content-length|transfer-encoding|lambda-runtime-function-error-type)[ \t]*:([^\r\n]*)",
    re.IGNORECASE,
)


def _head(head: bytes) -> Request | None:
    """The request line and the headers the API reads, by lowercase name, from a request's head
    (without the blank line); None if the request line is malformed."""
    end = head.find(b"\r\n")
    if end < 0:
        end = len(head)
    try:
        method, target, _ = head[:end].decode("latin-1").split(" ", 2)
    except ValueError:
        return None
    headers = {
        name.lower().decode(): value.strip().decode("latin-1")
        for name, value in _HEADERS.findall(head, end)
    }
    return Request(method, target.split("?", 1)[0].encode("latin-1"), headers)


def refusal_bytes(status: int, error_type: str, message: str) -> bytes:
    """The answer to a request that cannot be read: the connection is closed after it."""
    body = _api_error(error_type, message)
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "Connection: close\r\n\r\n"
    return head.encode() + body


# --- the API -------------------------------------------------------------------------------------


class Connection:
    """One HTTP connection of the bootstrap: its reader and the requests it has not served yet
    (those that came after a `next` still waiting for its invocation)."""

    __slots__ = ("reader", "backlog", "closing", "handle")

    def __init__(self, handle: Any) -> None:
        self.reader = RequestReader()
        self.backlog: list[Request] = []
        self.closing = False
        self.handle = handle  # the driver's: a socket, or a transport


class RuntimeApi:
    """The Runtime API of one bootstrap, without I/O: a driver feeds it the bootstrap's bytes
    (`received`) and the pool's invocations (`invoke`), and carries out its hooks (the methods
    that raise NotImplementedError)."""

    def __init__(self, init_timeout_s: float, memory_mb: int, bootstrap: str) -> None:
        self.memory_mb = memory_mb
        self.bootstrap = bootstrap  # its name, for the init timeout's message
        self.started = time.perf_counter()
        self.init_deadline = time.monotonic() + init_timeout_s
        self.init_timeout_s = init_timeout_s
        self.ready = False
        self.waiting: Connection | None = None  # a `next` not yet answered
        self.pending: Invoke | None = None  # an invocation the bootstrap has not asked for yet
        self.current: Invoke | None = None  # the invocation the bootstrap is running
        self.memory_due = 0.0  # when the running invocation's memory is checked next
        self.answered: list[str] = []
        self.status_fd = -1  # the bootstrap's /proc status and clear_refs, once known
        self.clear_refs_fd = -1

    # --- hooks --------------------------------------------------------------------------------

    def send_bytes(self, conn: Connection, data: bytes) -> None:
        """Write `data` to the connection; on failure set `conn.closing`."""
        raise NotImplementedError

    def close(self, conn: Connection) -> None:
        raise NotImplementedError

    def to_pool(self, message: Ready | InitFailed | Result) -> None:
        raise NotImplementedError

    def quiet(self) -> bool:
        """True when the bootstrap has written nothing since the pool last read its output."""
        raise NotImplementedError

    def log(self, line: str) -> None:
        """A line in the bootstrap's output (what the pool records for the call)."""
        raise NotImplementedError

    def out_of_memory(self) -> None:
        """The bootstrap went over its memory: ended at once, or right after the result."""
        raise NotImplementedError

    def finished(self) -> None:
        """An init failure has been sent: the bootstrap is of no further use."""
        raise NotImplementedError

    # --- the bootstrap's process --------------------------------------------------------------

    def watch_memory(self, pid: int) -> None:
        """Meter and limit process `pid` from now on."""
        try:
            self.status_fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            self.clear_refs_fd = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            pass  # gone already, or no /proc: its exit is seen; metering is then absent

    def close_memory(self) -> None:
        for fd in (self.status_fd, self.clear_refs_fd):
            if fd >= 0:
                os.close(fd)
        self.status_fd = self.clear_refs_fd = -1

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

    # --- events -------------------------------------------------------------------------------

    def received(self, conn: Connection, data: bytes) -> None:
        """Bytes from the bootstrap on `conn`."""
        conn.backlog += conn.reader.feed(data)
        self._serve(conn)
        if conn.closing:
            self.close(conn)

    def closed_connection(self, conn: Connection) -> None:
        if self.waiting is conn:
            self.waiting = None

    def invoke(self, invoke: Invoke) -> None:
        """An invocation from the pool."""
        self.pending = invoke
        if self.waiting is not None:
            self._deliver()

    def tick(self) -> None:
        """Time has passed: the init deadline, or the running call's memory check, may be due."""
        if not self.ready:
            if time.monotonic() >= self.init_deadline:
                self._init_timed_out()
        elif self.current is not None and time.monotonic() >= self.memory_due:
            self._check_memory()

    def due(self) -> float | None:
        """When `tick` has something to do next (time.monotonic), if ever."""
        if not self.ready:
            return self.init_deadline
        if self.current is not None:
            return self.memory_due
        return None

    # --- the requests -------------------------------------------------------------------------

    def _serve(self, conn: Connection) -> None:
        backlog = conn.backlog
        while backlog and not conn.closing and conn is not self.waiting:
            self._handle(conn, backlog.pop(0))
        refusal = conn.reader.refusal
        if refusal is not None and not backlog and not conn.closing:
            conn.closing = True  # a request it could not read: answered, then closed
            self.send_bytes(conn, refusal_bytes(*refusal))

    def _handle(self, conn: Connection, request: Request) -> None:
        path = request.path
        if request.too_large:
            current = self.current
            if current is not None and path.startswith(
                INVOCATION + current.invocation_id.encode() + b"/"
            ):
                self._finish_too_large()
            message = f"Exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."
            self._answer(conn, 413, _api_error("RequestEntityTooLarge", message))
            return
        if path == NEXT and request.method == "GET":
            self._next(conn)
        elif path.startswith(INVOCATION) and request.method == "POST":
            request_id, _, verb = path[len(INVOCATION) :].decode("utf-8", "replace").rpartition("/")
            if verb not in ("response", "error"):
                self._answer(conn, 404, _api_error("NotFound", "No such route"))
                return
            self._post(conn, request, request_id, verb)
        elif path == INIT_ERROR and request.method == "POST":
            self._init_error(conn, request)
        elif path == b"/2018-06-01/ping" or path == b"/ping":
            self._answer(conn, 200, b"pong")
        else:
            self._answer(conn, 404, _api_error("NotFound", "No such route"))

    def _next(self, conn: Connection) -> None:
        if self.current is not None or self.waiting is not None:
            message = "Runtime asked for the next invocation before answering the current one"
            if self.current is None:
                message = "Another request is already waiting for the next invocation"
            self._answer(conn, 403, _api_error("InvalidStateTransition", message))
            return
        self.waiting = conn
        if not self.ready:
            self.ready = True
            self.to_pool(Ready((time.perf_counter() - self.started) * 1000))
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
        self.send_bytes(conn, head.encode("utf-8", "replace") + event)
        self._serve(conn)  # what the connection sent after its `next` (pipelined)
        if conn.closing:
            self.close(conn)

    def _post(self, conn: Connection, request: Request, request_id: str, verb: str) -> None:
        current = self.current
        if current is None or request_id != current.invocation_id:
            if request_id in self.answered:
                error_type, message = "InvalidStateTransition", "Invocation already answered"
                self._answer(conn, 403, _api_error(error_type, f"{message}: {request_id}"))
            else:
                message = f"Invalid request ID: {request_id}"
                self._answer(conn, 400, _api_error("InvalidRequestID", message))
            return
        peak_kb, rss_kb = self._memory()
        if verb == "response":
            result = Result(True, request.body, None, None, peak_kb, False, rss_kb)
        else:
            error_type, message = _error_fields(request)
            result = Result(False, request.body, error_type, message, peak_kb, False, rss_kb)
        self._finish(result)  # first: the caller's answer is what waits on this
        self.send_bytes(conn, _ACCEPTED)

    def _finish(self, result: Result) -> None:
        current = self.current
        assert current is not None
        self.current = None
        self.answered.append(current.invocation_id)
        del self.answered[:-RECENT_IDS]
        result.quiet = self.quiet()
        self.to_pool(result)

    def _finish_too_large(self) -> None:
        error_type = "Function.ResponseSizeTooLarge"
        message = (
            f"Response payload size exceeded maximum allowed payload size "
            f"({MAX_RESPONSE_BYTES} bytes)."
        )
        peak_kb, rss_kb = self._memory()
        body = _json({"errorMessage": message, "errorType": error_type})
        self._finish(Result(False, body, error_type, message, peak_kb, False, rss_kb))

    def _init_error(self, conn: Connection, request: Request) -> None:
        if self.ready:
            message = "init/error after the runtime asked for an invocation"
            self._answer(conn, 403, _api_error("InvalidStateTransition", message))
            return
        self.send_bytes(conn, _ACCEPTED)
        error_type, message = _error_fields(request)
        payload = request.body if _is_json_object(request.body) else b""
        if not payload:
            payload = _json({"errorMessage": message, "errorType": error_type})
        self.init_failed(error_type, message, payload)

    def init_failed(self, error_type: str, message: str, payload: bytes | None = None) -> None:
        """Init ends in failure (once): the pool is told, and the bootstrap is ended."""
        if self.ready:
            return
        self.ready = True  # no Ready after this, and no second failure
        if payload is None:
            payload = _json({"errorMessage": message, "errorType": error_type})
        init_ms = (time.perf_counter() - self.started) * 1000
        self.to_pool(InitFailed(error_type, message, payload, init_ms))
        self.finished()

    def _init_timed_out(self) -> None:
        message = (
            f"Init timed out after {self.init_timeout_s:.2f} seconds: the bootstrap "
            f"{self.bootstrap} never asked for an invocation "
            "(GET /2018-06-01/runtime/invocation/next on AWS_LAMBDA_RUNTIME_API)"
        )
        self.init_failed("Sandbox.Timedout", message)

    def _check_memory(self) -> None:
        self.memory_due = time.monotonic() + MEMORY_CHECK_S
        _, rss_kb = self._memory()
        if rss_kb is None or rss_kb <= self.memory_mb * 1024:
            return
        current = self.current
        assert current is not None
        message = (
            f"RequestId: {current.invocation_id} Error: the runtime exceeded the memory limit "
            f"of {self.memory_mb} MB"
        )
        self.out_of_memory()
        self.log(f"[ERROR] Runtime.OutOfMemory: {message}\n")
        body = _json({"errorType": "Runtime.OutOfMemory", "errorMessage": message})
        result = Result(False, body, "Runtime.OutOfMemory", message, rss_kb, True, rss_kb)
        self._finish(result)

    def _answer(self, conn: Connection, status: int, body: bytes) -> None:
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: application/json"
        self.send_bytes(conn, f"{head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


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


_random: Any = None  # random.Random, seeded from os.urandom on first use


def _trace_id() -> str:
    """A fresh X-Ray trace header: random ids (not secrets, so no system call per call)."""
    global _random
    if _random is None:
        import random

        _random = random.Random(os.urandom(32))
    bits = f"{_random.getrandbits(160):040x}"
    return f"Root=1-{int(time.time()):08x}-{bits[:24]};Parent={bits[24:]};Sampled=0"


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def _error_fields(request: Request) -> tuple[str, str]:
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


def bootstrap_environment(env: dict[str, str]) -> dict[str, str]:
    """The bootstrap's environment from this process's: without what carried the daemon's
    tree to this process (its PYTHONPATH entry, the dependency folder variable)."""
    env = dict(env)
    entries = env.pop("PYTHONPATH", "").split(os.pathsep)
    if entries and entries[0] == _ROOT:
        del entries[0]
    if any(entries):
        env["PYTHONPATH"] = os.pathsep.join(entries)
    env.pop(DEPS_ENV, None)
    return env


def bootstrap_name(argv: list[str]) -> str:
    """The bootstrap as messages name it: the script a runtime binary runs, or the program."""
    return argv[-1] if len(argv) > 1 else argv[0]


# --- the bridge: a process of its own ------------------------------------------------------------


class Bridge(RuntimeApi):
    """The API on a loopback port of this process, the bootstrap its child, the pool at the
    other end of the control socket."""

    def __init__(self, control_fd: int, argv: list[str], init_timeout_s: float) -> None:
        memory_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
        super().__init__(init_timeout_s, memory_mb, bootstrap_name(argv))
        self.control = WorkerChannel(control_fd)
        self.control_fd = control_fd
        self.argv = argv
        self.poll = select.epoll()
        self.connections: dict[int, Connection] = {}  # by descriptor
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.child = -1

    def spawn(self) -> int:
        env = bootstrap_environment(dict(os.environ))
        host, port = self.listener.getsockname()
        env["AWS_LAMBDA_RUNTIME_API"] = f"{host}:{port}"
        self.child = os.posix_spawn(self.argv[0], self.argv, env)
        self.watch_memory(self.child)
        return os.pidfd_open(self.child)

    def exit_like_child(self) -> None:
        """Exit with the bootstrap's exit status (a signal by the same signal)."""
        _, status = os.waitpid(self.child, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            code = 128 - code
        os._exit(code)

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
            due = self.due()
            timeout = -1.0 if due is None else max(0.0, due - time.monotonic())
            for fd, _ in poll.poll(timeout):
                conn = connections.get(fd)
                if conn is not None:
                    try:
                        data = conn.handle.recv(READ_BYTES)
                    except OSError:
                        data = b""
                    if data:
                        self.received(conn, data)
                    else:
                        self.close(conn)
                elif fd == self.control_fd:
                    invoke = self.control.receive()
                    if invoke is None:  # the pool is done with this worker
                        self._end()
                    else:
                        self.invoke(invoke)
                elif fd == listener_fd:
                    self._accept()
                elif fd == pidfd:
                    self.exit_like_child()
            self.tick()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(True)  # answers are small, or a body the client reads as it comes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections[sock.fileno()] = Connection(sock)
        self.poll.register(sock.fileno(), select.EPOLLIN)

    def _end(self) -> None:
        try:
            os.kill(self.child, signal.SIGKILL)
        except OSError:
            pass
        os._exit(0)

    # hooks

    def send_bytes(self, conn: Connection, data: bytes) -> None:
        try:
            conn.handle.sendall(data)
        except OSError:
            conn.closing = True

    def close(self, conn: Connection) -> None:
        self.closed_connection(conn)
        sock = conn.handle
        fd = sock.fileno()
        if self.connections.get(fd) is conn:
            del self.connections[fd]
            self.poll.unregister(fd)
        sock.close()

    def to_pool(self, message: Ready | InitFailed | Result) -> None:
        self.control.send(message)

    def quiet(self) -> bool:
        try:
            return os.fstat(1).st_size == 0
        except OSError:
            return False

    def log(self, line: str) -> None:
        os.write(1, line.encode())

    def out_of_memory(self) -> None:
        try:
            os.kill(self.child, signal.SIGKILL)
        except OSError:
            pass

    def finished(self) -> None:
        self._end()


def bridge_main(argv: list[str]) -> None:
    fd, daemon_pid, init_timeout_s = int(argv[0]), int(argv[1]), float(argv[2])
    bootstrap = argv[3:]
    _die_with_daemon(daemon_pid)
    _yield_to_the_daemon()
    bridge = Bridge(_hide_channel(fd), bootstrap, init_timeout_s)
    try:
        bridge.run()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC) and bridge.child < 0:
            # The bootstrap could not be started: an init failure naming it.
            message = f"Cannot start the bootstrap {bootstrap[0]}: {exc.strerror}"
            bridge.control.send(_invalid_entrypoint(bridge.started, message))
            os._exit(1)
        raise


def _invalid_entrypoint(started: float, message: str) -> InitFailed:
    payload = _json({"errorMessage": message, "errorType": "Runtime.InvalidEntrypoint"})
    init_ms = (time.perf_counter() - started) * 1000
    return InitFailed("Runtime.InvalidEntrypoint", message, payload, init_ms)


# --- the bootstrap started by the pool itself ----------------------------------------------------


def exec_bootstrap(argv: list[str]) -> None:
    """`--exec <fd> <daemon pid> <bootstrap argv...>`: become the bootstrap, killed with the
    daemon, the pool serving its Runtime API on AWS_LAMBDA_RUNTIME_API."""
    fd, daemon_pid, bootstrap = int(argv[0]), int(argv[1]), argv[2:]
    _die_with_daemon(daemon_pid)  # the signal stays set across exec
    _yield_to_the_daemon()
    os.close(fd)  # the control socket: this worker's channel is the Runtime API
    env = bootstrap_environment(dict(os.environ))
    try:
        os.execve(bootstrap[0], bootstrap, env)
    except OSError as exc:
        # Told to the pool as Lambda's runtime would be: an init error on the API.
        message = f"Cannot start the bootstrap {bootstrap[0]}: {exc.strerror}"
        failure = _invalid_entrypoint(time.perf_counter(), message)
        import http.client

        connection = http.client.HTTPConnection(env.get("AWS_LAMBDA_RUNTIME_API", ""), timeout=5)
        try:
            connection.request(
                "POST",
                INIT_ERROR.decode(),
                failure.payload,
                {"Lambda-Runtime-Function-Error-Type": failure.error_type},
            )
            connection.getresponse().read()
        except OSError:
            pass
        os._exit(1)


def main() -> None:
    argv = sys.argv[1:]
    del sys.argv[1:]
    if argv and argv[0] == "--exec":
        exec_bootstrap(argv[1:])
    else:
        bridge_main(argv)


if __name__ == "__main__":
    main()
