"""Worker process: imports one handler and serves its invocations one at a time.

The supervisor starts it as ``python -m daemon.pool.worker <control fd> <daemon pid>`` with a
clean environment (the function's settings arrive as Lambda's reserved variables, as in the RIC),
the function's code folder as working directory, fd 1 and 2 on the capture memfd and a process
group of its own. It sets its memory limit, imports the handler (init), says `Ready` (or
`InitFailed` and exits), then answers each `Invoke` with a `Result`. EOF on the control socket
means: exit.

Only the standard library is imported here: every millisecond counts on a cold start, and every
megabyte of a warm worker counts against the daemon's idle memory budget.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.py: its enums cost the start 0.75 ms
import binascii
import ctypes
import faulthandler
import importlib
import io
import json
import logging
import os
import resource
import sys
import time
import traceback
import types

from daemon.pool.protocol import (
    DEPS_ENV,
    MAX_ERROR_TEXT_BYTES,
    MAX_RESPONSE_BYTES,
    InitFailed,
    Invoke,
    Ready,
    Result,
    WorkerChannel,
)

TYPE_CHECKING = False  # not typing's: typing is never imported here (~0.4 MB, ~3 ms)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Headroom above the handler's budget, usable only by this module (soft limit -> hard limit) to
# report a MemoryError instead of dying while building the report.
_OOM_RESERVE_BYTES = 32 * 1024 * 1024
_ASYNCIO_DIR = os.path.join(os.path.dirname(os.__file__), "asyncio", "")

_request_id = ""  # read by the logging filter: every record carries the current request id


class _Identity:
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self) -> None:
        self.cognito_identity_id = None
        self.cognito_identity_pool_id = None


class _Client:
    __slots__ = (
        "installation_id",
        "app_title",
        "app_version_name",
        "app_version_code",
        "app_package_name",
    )


class _ClientContext:
    __slots__ = ("custom", "env", "client")
    custom: Any
    env: Any
    client: _Client | None


def _from_dict(cls: Any, data: Any) -> Any:
    if not isinstance(data, dict):
        return None
    obj = cls()
    for name in cls.__slots__:
        setattr(obj, name, data.get(name))
    return obj


class LambdaContext:
    """The `context` argument, with the attributes and types of AWS's Python runtime client."""

    __slots__ = (
        "aws_request_id",
        "invoked_function_arn",
        "client_context",
        "identity",
        "tenant_id",
        "_deadline_ms",
    )
    # Set once at start from the reserved variables (class attributes: the same for every call).
    function_name: str | None = None
    function_version: str | None = None
    memory_limit_in_mb: str | None = None  # a str, as in the RIC
    log_group_name: str | None = None
    log_stream_name: str | None = None

    def __init__(self, invoke: Invoke) -> None:
        self.aws_request_id = invoke.invocation_id
        self.invoked_function_arn = invoke.invoked_arn
        self.identity = _Identity()
        self.tenant_id = None
        self.client_context = _decode_client_context(invoke.client_context)
        self._deadline_ms = invoke.deadline_ms

    @classmethod
    def configure(cls) -> None:
        env = os.environ
        cls.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME")
        cls.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION")
        cls.memory_limit_in_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        cls.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME")
        cls.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME")

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))

    def log(self, msg: object) -> None:
        sys.stdout.write(str(msg))

    def __repr__(self) -> str:
        return f"LambdaContext(aws_request_id={self.aws_request_id!r})"


def _decode_client_context(encoded: str | None) -> _ClientContext | None:
    if not encoded:
        return None
    data = json.loads(binascii.a2b_base64(encoded))
    context: _ClientContext | None = _from_dict(_ClientContext, data)
    if context is not None:
        context.client = _from_dict(_Client, context.client)
    return context


class _InitError(Exception):
    def __init__(self, error_type: str, message: str, stack: list[str]) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.stack = stack


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = _request_id
        return True


# --- JSON ---------------------------------------------------------------------------------------
# Results are encoded as the RIC does (json with a Decimal hook), but compact, UTF-8 and strict:
# NaN and infinities are refused (they are not JSON) instead of written as bare NaN/Infinity.


class _HoldsDecimal(Exception):
    """From the fast encoder's hook: the value holds a Decimal, so the slow encoder must run."""


def _unencodable(value: Any) -> Any:
    # `decimal` is imported only by handlers that use it: no Decimal can exist without it.
    decimal = sys.modules.get("decimal")
    if decimal is not None and isinstance(value, decimal.Decimal):
        raise _HoldsDecimal
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    separators=(",", ":"),
    default=_unencodable,
)


class _TooLarge(Exception):
    """A result whose JSON is over MAX_RESPONSE_BYTES; `size` is its length in bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _to_json(value: Any, limit: int | None = None) -> bytes:
    """Compact UTF-8 JSON; ValueError, TypeError or RecursionError when `value` cannot be.

    With `limit`: _TooLarge when ASCII text is already longer than that, before it is encoded
    (isascii() costs nothing in CPython), so a 300 MB result is not copied once more to learn it.
    """
    try:
        text = _ENCODER.encode(value)
    except _HoldsDecimal:
        text = _encode_with_decimals(value)
    if limit is not None and len(text) > limit and text.isascii():
        raise _TooLarge(len(text))
    # A lone surrogate (from a file name decoded with surrogateescape, say) can only be inside a
    # JSON string here; backslashreplace writes it as the JSON escape \udcXX, as ensure_ascii does.
    return text.encode("utf-8", "backslashreplace")


def _encode_with_decimals(value: Any) -> str:
    """JSON in which a Decimal is a number with its exact digits ("12.50" stays 12.50).

    The C encoder writes numbers only with its own float and int formatting, so this runs json's
    pure-Python encoder (slower; needed only when a Decimal is there, as in DynamoDB items), with
    the number formatting given here: each Decimal goes in as a float that carries its text.
    """
    decimal_type = sys.modules["decimal"].Decimal

    def default(value: Any) -> Any:
        if isinstance(value, decimal_type):
            if not value.is_finite():
                raise ValueError(f"Out of range decimal values are not JSON compliant: {value}")
            return _DecimalDigits(decimal_type.__str__(value))
        return _unencodable(value)

    def number(value: float) -> str:
        if type(value) is _DecimalDigits:
            return value.digits
        if value != value or value in (_INFINITY, -_INFINITY):
            raise ValueError(f"Out of range float values are not JSON compliant: {value!r}")
        return float.__repr__(value)

    chunks = json.encoder._make_iterencode(  # type: ignore[attr-defined]
        {},
        default,
        json.encoder.encode_basestring,
        None,
        number,
        ":",
        ",",
        False,
        False,
        True,
    )
    return "".join(chunks(value, 0))


class _DecimalDigits(float):
    """A finite Decimal's text, and its value as a float, for _encode_with_decimals."""

    def __init__(self, digits: str) -> None:
        self.digits = digits


_INFINITY = float("inf")


# --- start-up ---------------------------------------------------------------------------------


def _detach_bootstrap_path() -> None:
    """Undo the PYTHONPATH entry the supervisor added so this module could be found; put the
    code folder first on sys.path, then the function's dependency folder if it has one."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    entries = os.environ.pop("PYTHONPATH", "").split(os.pathsep)
    if entries[0] == root:
        del entries[0]
    if any(entries):
        os.environ["PYTHONPATH"] = os.pathsep.join(entries)
    if root != os.getcwd() and root in sys.path:
        sys.path.remove(root)
    code = os.environ.get("LAMBDA_TASK_ROOT") or os.getcwd()
    if sys.path[:1] != [code]:
        sys.path.insert(0, code)
    if deps := os.environ.pop(DEPS_ENV, ""):
        if deps in sys.path:
            sys.path.remove(deps)
        sys.path.insert(1, deps)  # before the standard library, as Lambda's task root is


def _set_up_output() -> None:
    global _CAPTURE_FD, _LOG_HANDLER
    # Unbuffered like `python -u` (and Lambda): output written just before a crash or a timeout
    # kill must already be in the capture file, in the order it was written.
    sys.stdout, sys.stderr = _unbuffered(1), _unbuffered(2)
    _CAPTURE_FD = os.dup(1)  # the capture file itself, whatever a handler does to fd 1 and 2
    _LOG_HANDLER = handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_RequestIdFilter())
    logging.getLogger().addHandler(handler)
    faulthandler.enable()  # a segfaulting handler leaves its Python stack in the captured output


def _quiet() -> bool:
    """Nothing captured since the daemon emptied the capture file: it need not read it (two
    system calls fewer in its event loop; the worker's one fstat is spent off that loop).

    The fstat is of fd 1, which tells whether fd 1 is still the capture file as well: one a
    handler closed or replaced is put back here (fd 2 is `_restore_state`'s).
    """
    if _CAPTURE_FD < 0:
        return False
    try:
        stat = os.fstat(1)
        if (stat.st_dev, stat.st_ino) == _CAPTURE_INODE:
            return stat.st_size == 0
    except OSError:  # closed
        pass
    os.dup2(_CAPTURE_FD, 1)
    return os.fstat(_CAPTURE_FD).st_size == 0


_CAPTURE_FD = -1


def _unbuffered(fd: int) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", write_through=True)


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space at what the interpreter maps now plus `memory_mb`.

    RLIMIT_AS counts virtual memory: the interpreter and the shared libraries already map
    tens of MB before any handler code runs, so the baseline is added to keep `memory_mb` as the
    handler's own budget. Threads cost address space too (8 MB stack, and a 64 MB malloc arena
    reservation per thread that allocates), so thread-heavy handlers need a larger memory_mb.
    """
    limit = _status_kb(b"VmSize:") * 1024 + memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard - _OOM_RESERVE_BYTES)
        hard_limit = hard
    else:
        hard_limit = limit + _OOM_RESERVE_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard_limit))


def _relax_memory_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


_STATUS_FD = -1


def _status_kb(field: bytes, status: bytes | None = None) -> int:
    status = os.pread(_STATUS_FD, 8192, 0) if status is None else status
    start = status.index(field) + len(field)
    return int(status[start : status.index(b"kB", start)])


def _memory_kb() -> tuple[int, int]:
    """This invocation's peak RSS and the RSS now (the supervisor recycles on the latter)."""
    status = os.pread(_STATUS_FD, 8192, 0)  # one read for both
    return _status_kb(b"VmHWM:", status), _status_kb(b"VmRSS:", status)


def _load_handler(spec: str) -> Callable[[Any, LambdaContext], Any]:
    """Import the handler like the RIC does, mapping failures to its Runtime.* error types."""
    name, _, attr = spec.rpartition(".")
    if not name:
        raise _InitError("Runtime.MalformedHandlerName", f"Bad handler '{spec}': no module", [])
    name = name.replace("/", ".")
    if name.split(".")[0] in sys.builtin_module_names:
        message = f"Cannot use built-in module {name} as a handler module"
        raise _InitError("Runtime.BuiltInModuleConflict", message, [])
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        message = f"Unable to import module '{name}': {exc}"
        raise _InitError("Runtime.ImportModuleError", message, []) from None
    except SyntaxError as exc:
        where = f'  File "{exc.filename}" Line {exc.lineno}\n    {(exc.text or "").strip()}\n'
        message = f"Syntax error in module '{name}': {exc}"
        raise _InitError("Runtime.UserCodeSyntaxError", message, [where]) from None
    try:
        return getattr(module, attr)  # type: ignore[no-any-return]
    except AttributeError:
        message = f"Handler '{attr}' missing on module '{name}'"
        raise _InitError("Runtime.HandlerNotFound", message, []) from None


# --- one invocation ---------------------------------------------------------------------------


_loop: Any = None


def _run_coroutine(coroutine: Any) -> Any:
    """Run an `async def` handler on this worker's own event loop, kept across invocations."""
    global _loop
    if _loop is None:
        _loop = _new_loop()
    _loop.handler_task = task = _loop.create_task(coroutine)
    try:
        return _loop.run_until_complete(task)
    finally:
        _loop.handler_task = None


def _new_loop() -> Any:
    """The worker's event loop, which notes a `stop()` called by a handler's own code.

    Such a stop leaves run_until_complete's own stop callback queued in the loop after the
    call returns, and the next call on it fails at once ("Event loop stopped before Future
    completed"): a worker whose loop a handler stopped is replaced (`_restore_state`).
    """
    import asyncio

    class WorkerLoop(asyncio.SelectorEventLoop):
        handler_task: asyncio.Task[Any] | None = None
        stopped_by_handler = False

        def stop(self) -> None:
            # run_until_complete stops the loop itself, once the handler's task is done; any
            # other stop (the handler's code, a callback or task it left) is the handler's.
            task = self.handler_task
            if task is None or not task.done():
                self.stopped_by_handler = True
            super().stop()

    loop = WorkerLoop()
    asyncio.set_event_loop(loop)
    return loop


def _invoke(handler: Callable[[Any, LambdaContext], Any], invoke: Invoke) -> Result:
    global _request_id
    _request_id = invoke.invocation_id
    _reset_peak_memory()
    try:
        context = LambdaContext(invoke)
        event = json.loads(invoke.event) if invoke.event else {}
    except (ValueError, RecursionError) as exc:
        message = f"Unable to unmarshal input: {exc}"
        return _failure(invoke, "Runtime.UnmarshalError", message, [])
    try:
        result = handler(event, context)
        if type(result) is types.CoroutineType:
            result = _run_coroutine(result)
    except MemoryError:
        raise
    except Exception as exc:
        return _failure(invoke, type(exc).__name__, str(exc), _user_stack(exc))
    if type(result) is bytes:
        payload = result
    else:
        try:
            payload = _to_json(result, MAX_RESPONSE_BYTES)
        except _TooLarge as exc:
            return _too_large(exc.size)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            message = f"Unable to marshal response: {exc}"
            return _failure(invoke, "Runtime.MarshalError", message, [])
    if len(payload) > MAX_RESPONSE_BYTES:
        return _too_large(len(payload))
    peak_kb, rss_kb = _memory_kb()
    return Result(True, payload, None, None, peak_kb, False, rss_kb)


def _too_large(size: int) -> Result:
    """Lambda's error for a response over its limit. Measured here, before anything is sent,
    so the frame to the daemon stays within its bound and the worker serves the next call."""
    error_type = "Function.ResponseSizeTooLarge"
    message = (
        f"Response payload size ({size} bytes) exceeded maximum allowed payload size "
        f"({MAX_RESPONSE_BYTES} bytes)."
    )
    _log_error(error_type, message, [])
    body = _to_json({"errorMessage": message, "errorType": error_type})
    peak_kb, rss_kb = _memory_kb()
    return Result(False, body, error_type, message, peak_kb, False, rss_kb)


def _failure(invoke: Invoke, error_type: str, message: str, stack: list[str]) -> Result:
    body = _error_body(error_type, message, invoke.invocation_id, stack)
    _log_error(error_type, message, stack)
    peak_kb, rss_kb = _memory_kb()
    return Result(False, body, error_type, message, peak_kb, False, rss_kb)


_STACK_KEPT = 50  # frames of a stack trace kept when the error JSON is over the limit


def _error_body(error_type: str, message: str, request_id: str, stack: list[str]) -> bytes:
    """Lambda's error JSON, within MAX_RESPONSE_BYTES: an exception's message (or a frame's
    source line) can be any size, so an error over the limit keeps the start of its message
    and the innermost frames, each cut short, rather than failing the frame to the daemon."""
    body = {
        "errorMessage": message,
        "errorType": error_type,
        "requestId": request_id,
        "stackTrace": stack,
    }
    encoded = _to_json(body)
    if len(encoded) <= MAX_RESPONSE_BYTES:
        return encoded
    cut = MAX_ERROR_TEXT_BYTES // 4  # characters: at most 6 bytes each once escaped
    body["errorMessage"] = f"{message[:cut]} [lambdaemon: truncated from {len(message)} characters]"
    body["errorType"] = error_type[:cut]
    body["stackTrace"] = [frame[:1024] for frame in stack[-_STACK_KEPT:]]
    return _to_json(body)


def _out_of_memory(invoke: Invoke, exc: MemoryError) -> Result:
    _relax_memory_limit()
    limit = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "?")
    message = (
        f"RequestId: {invoke.invocation_id} Error: handler exceeded the memory limit of {limit} MB"
    )
    _log_error("Runtime.OutOfMemory", message, _user_stack(exc))
    body = _to_json({"errorType": "Runtime.OutOfMemory", "errorMessage": message})
    peak_kb = _status_kb(b"VmHWM:")
    return Result(False, body, "Runtime.OutOfMemory", message, peak_kb, retire=True)


def _user_stack(exc: BaseException) -> list[str]:
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename != __file__ and not frame.filename.startswith("<frozen importlib")
    ]
    while frames and frames[0].filename.startswith(_ASYNCIO_DIR):
        del frames[0]
    return traceback.format_list(frames)


def _log_error(error_type: str, message: str, stack: list[str]) -> None:
    # The RIC's record: one line per error, frames joined by \r so log shippers keep it together.
    lines = [f"[ERROR] {error_type}: {message}"]
    if stack:
        lines.append("Traceback (most recent call last):")
        lines.extend(line for frame in stack for line in frame.splitlines())
    os.write(1, ("\r".join(lines) + "\n").encode("utf-8", "backslashreplace"))


_CLEAR_REFS_FD = -1


def _reset_peak_memory() -> None:
    # Writing 5 resets VmHWM, so it measures this invocation rather than the worker's lifetime.
    # (getrusage's ru_maxrss is no use here: exec() seeds it with the daemon's own RSS.)
    if _CLEAR_REFS_FD >= 0:
        os.write(_CLEAR_REFS_FD, b"5")


def _yield_to_the_daemon() -> None:
    # SCHED_BATCH: a worker woken by its next invocation does not preempt the daemon's event
    # loop in the middle of its turn (on a busy board that stalled every other caller for the
    # length of the handler); it keeps its nice value and its share of the CPU.
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: run as the daemon does
        pass


# --- what a handler may leave broken ----------------------------------------------------------

_CWD = ""
_STDOUT: Any = None
_STDERR: Any = None
_CAPTURE_INODE = (0, 0)
_LOG_HANDLER: Any = None  # the root logger's handler, on sys.stderr


def _remember_state() -> None:
    """Note what `_restore_state` puts back after each call (at start, before the handler)."""
    global _CWD, _STDOUT, _STDERR, _CAPTURE_INODE
    _CWD = os.getcwd()
    _STDOUT, _STDERR = sys.stdout, sys.stderr
    capture = os.fstat(_CAPTURE_FD)
    _CAPTURE_INODE = (capture.st_dev, capture.st_ino)


def _restore_state() -> str | None:
    """Undo what a handler changed that would break the next call on this worker; the reason
    to retire the worker when something cannot be undone.

    The working directory goes back to the code folder, a pending alarm is cancelled (its
    SIGALRM would end the worker between calls, or in the middle of another caller's call),
    and fd 2 is the capture file again (fd 1: `_quiet`, which runs next), with sys.stdout
    and sys.stderr on them. A stopped or closed event loop cannot be trusted with the next
    call: the worker retires. Three system calls a call (alarm, getcwd, fstat): 3 to 4 us.
    """
    _signal.alarm(0)
    try:
        moved = os.getcwd() != _CWD
    except OSError:  # the handler removed the directory it moved to
        moved = True
    if moved:
        try:
            os.chdir(_CWD)
        except OSError as exc:
            return f"cannot return to the code folder: {exc}"
    try:
        stat = os.fstat(2)
        same = (stat.st_dev, stat.st_ino) == _CAPTURE_INODE
    except OSError:  # closed
        same = False
    if not same:
        os.dup2(_CAPTURE_FD, 2)
    if sys.stdout is not _STDOUT or sys.stderr is not _STDERR or _STDOUT.closed or _STDERR.closed:
        _reset_streams()
    if _loop is not None and (_loop.stopped_by_handler or _loop.is_closed()):
        return "the handler stopped or closed the worker's event loop"
    return None


def _reset_streams() -> None:
    """sys.stdout and sys.stderr back on fd 1 and 2 (new ones, if a handler closed ours), and
    the logging handler on the latter."""
    global _STDOUT, _STDERR
    if _STDOUT.closed:
        _STDOUT = _unbuffered(1)
    if _STDERR.closed:
        _STDERR = _unbuffered(2)
        _LOG_HANDLER.stream = _STDERR  # not setStream(): it flushes the closed one first
    sys.stdout, sys.stderr = _STDOUT, _STDERR


def _retire_note(reason: str) -> None:
    os.write(_CAPTURE_FD, f"[lambdaemon] this worker is replaced: {reason}\n".encode())


# --- main -------------------------------------------------------------------------------------


def _open_proc_files() -> None:
    global _STATUS_FD, _CLEAR_REFS_FD
    _STATUS_FD = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _CLEAR_REFS_FD = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        _CLEAR_REFS_FD = -1  # peak memory is then the worker's lifetime peak


def _init(control: WorkerChannel) -> Callable[[Any, LambdaContext], Any] | None:
    started = time.perf_counter()
    try:
        handler = _load_handler(os.environ.get("_HANDLER", ""))
    except _InitError as exc:
        error = (exc.error_type, exc.message, exc.stack)
    except MemoryError as exc:
        _relax_memory_limit()
        limit = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "?")
        message = f"Init exceeded the memory limit of {limit} MB"
        error = ("Runtime.OutOfMemory", message, _user_stack(exc))
    except Exception as exc:
        error = (type(exc).__name__, str(exc), _user_stack(exc))
    else:
        control.send(Ready((time.perf_counter() - started) * 1000))
        return handler
    init_ms = (time.perf_counter() - started) * 1000
    error_type, message, stack = error
    _log_error(error_type, message, stack)
    body = _error_body(error_type, message, "", stack)
    control.send(InitFailed(error_type, message, body, init_ms))
    return None


def _die_with_daemon(daemon_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the daemon dies, even by SIGKILL.

    The daemon enforces timeouts: a worker outliving it could run a hung handler forever.
    """
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != daemon_pid:  # it died before the line above
        os._exit(1)


def _hide_channel(fd: int) -> int:
    """Move the control socket from the descriptor it was passed on to a random one from 100
    up, below the soft NOFILE limit (and 1000): a handler writing to descriptors it guesses
    (3, 4, ...) hits nothing of the worker's. Not inheritable: the handler's subprocesses
    must not keep the channel open. (Corrupt bytes that still reach it end the worker at once:
    the daemon checks every frame.)"""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = 1000 if soft == resource.RLIM_INFINITY else min(1000, soft)
    for _ in range(8):
        if top <= 101:
            break
        target = 100 + int.from_bytes(os.urandom(2), "big") % (top - 100)
        try:
            os.fstat(target)
            continue  # taken
        except OSError:
            pass
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
        return target
    os.set_inheritable(fd, False)
    return fd


def main() -> None:
    fd, daemon_pid = int(sys.argv[1]), int(sys.argv[2])
    del sys.argv[1:]  # the descriptor's number is no one else's business
    _die_with_daemon(daemon_pid)
    _yield_to_the_daemon()
    control = WorkerChannel(_hide_channel(fd))
    _detach_bootstrap_path()
    _open_proc_files()
    _set_up_output()
    _remember_state()
    LambdaContext.configure()
    _limit_memory(int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")))
    handler = _init(control)
    if handler is None:
        return
    while (invoke := control.receive()) is not None:
        try:
            result = _invoke(handler, invoke)
            if (broken := _restore_state()) is not None:
                _retire_note(broken)
                result.retire = True
            result.quiet = _quiet()
        except MemoryError as exc:
            result = _out_of_memory(invoke, exc)
        control.send(result)
        if result.retire:
            return


if __name__ == "__main__":
    main()
