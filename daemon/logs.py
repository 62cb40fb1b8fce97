"""structlog set-up: JSON lines for journald when stdout is not a terminal, console otherwise.

The JSON path is on every invocation's hot path (two events each), so it is kept short: a
cached-second timestamp, rendering with msgspec straight to bytes, and output gathered while
the event loop runs its current callbacks and written with one write() right after them.
Under load that is one write per loop iteration instead of one per line (each write to
journald's socket also wakes journald). Warnings and errors, lines logged outside the loop,
and a full buffer are written at once, after what is gathered, so the order holds. A SIGKILL
can lose the lines of the iteration it interrupts; the invocation records are in SQLite.
Libraries that log through stdlib `logging` (aiohttp, paho, asyncio) come out as the same JSON
lines.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from typing import Any, BinaryIO

import msgspec
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# journald reads a leading <N> as the syslog priority, so `journalctl -p warning` works.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}
_encoder = msgspec.json.Encoder(enc_hook=str)  # anything exotic (paths, exceptions) as text


_FLUSH_AT_BYTES = 64 * 1024


def _timestamp(_logger: object, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["timestamp"] = _now()
    return event_dict


def _now() -> str:
    """ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes
    it, with the date and time of day formatted once per second."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int((now - second) * 1e6):06d}Z"


_second: list[Any] = [-1, ""]


class _GatheredOutput:
    """structlog's logger for the JSON path: lines gathered per loop iteration (module doc)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._size = 0
        self._pending: asyncio.AbstractEventLoop | None = None  # the loop due to flush
        # The loop last found running, and its thread: asking asyncio for the running loop
        # costs a getpid() system call on Python 3.11, once per iteration with lines.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._lock = threading.Lock()  # library logging may come from other threads
        atexit.register(self.flush)

    def msg(self, line: bytes) -> None:
        with self._lock:
            self._lines.append(line)
            self._size += len(line) + 1
            if self._size < _FLUSH_AT_BYTES:
                if self._pending is not None and self._pending.is_running():
                    return  # that loop writes what is gathered at the end of its turn
                loop = self._loop
                # One thread runs one loop at a time: in its thread, a running loop is the one.
                if (
                    loop is None
                    or threading.get_ident() != self._loop_thread
                    or (not loop.is_running())
                ):
                    loop = self._find_loop()
                if loop is not None:
                    self._pending = loop
                    loop.call_soon(self.flush)
                    return
            self._write()

    def _find_loop(self) -> asyncio.AbstractEventLoop | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: write now
            return None
        self._loop, self._loop_thread = loop, threading.get_ident()
        return loop

    def urgent(self, line: bytes) -> None:
        with self._lock:
            self._lines.append(line)
            self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        self._pending = None
        if not self._lines:
            return
        self._lines.append(b"")  # the last line's newline
        data = b"\n".join(self._lines)
        self._lines.clear()
        self._size = 0
        self._stream.write(data)
        self._stream.flush()

    log = debug = info = msg
    warn = warning = fatal = failure = err = error = critical = exception = urgent


_outputs: list[_GatheredOutput] = []


def flush() -> None:
    """Write the lines gathered so far now: before telling systemd something, say."""
    for output in _outputs:
        output.flush()


class _HotPath:
    """What configure_logging set up, for the per-invocation lines: the JSON output and the
    config it belongs to."""

    out: _GatheredOutput | None = None  # None: no JSON output, or info lines are filtered out
    factory: Any = None
    processors: Any = None


# The two lines logged for every invocation, as Structs: their keys in the order structlog's
# line has them (the call's keywords, then event, level, timestamp), encoded without a dict.
class _Started(msgspec.Struct):
    invocation_id: str
    function: str
    attempt: int
    event: str
    level: str
    timestamp: str


class _Finished(msgspec.Struct):
    invocation_id: str
    function: str
    status: str
    attempt: int
    duration_ms: float
    error_type: str | None
    event: str
    level: str
    timestamp: str


def invocation_started(logger: Any, invocation_id: str, function: str, attempt: int) -> None:
    """logger.info("invocation_started", invocation_id=, function=, attempt=), the same line."""
    out = _hot_output()
    if out is None:
        logger.info(
            "invocation_started", invocation_id=invocation_id, function=function, attempt=attempt
        )
        return
    line = _Started(invocation_id, function, attempt, "invocation_started", "info", _now())
    out.msg(b"<6>" + _encoder.encode(line))


def invocation_finished(
    logger: Any,
    invocation_id: str,
    function: str,
    status: str,
    attempt: int,
    duration_ms: float,
    error_type: str | None,
) -> None:
    """logger.info("invocation_finished", invocation_id=, function=, status=, attempt=,
    duration_ms=, error_type=), the same line."""
    out = _hot_output()
    if out is None:
        logger.info(
            "invocation_finished",
            invocation_id=invocation_id,
            function=function,
            status=status,
            attempt=attempt,
            duration_ms=duration_ms,
            error_type=error_type,
        )
        return
    line = _Finished(
        invocation_id,
        function,
        status,
        attempt,
        duration_ms,
        error_type,
        "invocation_finished",
        "info",
        _now(),
    )
    out.msg(b"<6>" + _encoder.encode(line))


def _hot_output() -> _GatheredOutput | None:
    """The JSON output, if structlog is still configured as configure_logging left it.

    The two per-invocation lines skip structlog's proxy, level filter and processor chain,
    which cost as much as the rendering. Whenever structlog is configured otherwise (console
    output, a higher level, tests capturing logs), they go through the logger as any line.
    """
    out = _HotPath.out
    if out is None:
        return None
    config = structlog.get_config()
    processors = _HotPath.processors
    if (
        config["logger_factory"] is _HotPath.factory
        and config["processors"] is processors
        and processors[-1] is _render_journal
    ):
        return out
    return None


def _render_journal(_logger: object, method: str, event_dict: dict[str, Any]) -> bytes:
    try:
        line = _encoder.encode(event_dict)
    except UnicodeEncodeError:  # text from outside that is not Unicode (a file name's bytes)
        line = _encoder.encode({k: _escaped(v) for k, v in event_dict.items()})
    return b"<%d>%s" % (_PRIORITY.get(method, 6), line)


def _escaped(value: Any) -> Any:
    if isinstance(value, int | float) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")  # as enc_hook would


class _ForeignHandler(logging.Handler):
    """Stdlib log records as the same JSON (or console) lines, through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            message = record.getMessage()
            if record.exc_info:
                logger.log(record.levelno, message, exc_info=record.exc_info)
            else:
                logger.log(record.levelno, message)
        except Exception:
            self.handleError(record)


def configure_logging(
    level: str = "info", *, json: bool | None = None, stream: BinaryIO | None = None
) -> None:
    """Configure structlog, and route stdlib logging from libraries through it."""
    if json is None:
        json = not sys.stdout.isatty()
    shared: list[Any] = [structlog.processors.add_log_level, _timestamp]
    if json:
        out = _GatheredOutput(stream or sys.stdout.buffer)
        _outputs[:] = [out]
        processors = [*shared, structlog.processors.format_exc_info, _render_journal]
        factory: Any = lambda *_args: out  # noqa: E731
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    config = structlog.get_config()
    _HotPath.out = out if json and _LEVELS[level] <= logging.INFO else None
    _HotPath.factory, _HotPath.processors = config["logger_factory"], config["processors"]
    # Libraries are kept to warnings unless the daemon itself runs at debug.
    root = logging.getLogger()
    root.handlers[:] = [_ForeignHandler()]
    root.setLevel(max(logging.WARNING, _LEVELS[level]))


class Throttle:
    """Bounds how often one kind of event is logged: `burst` lines per `window_s` per kind, then
    silence until the window ends; the next line says how many were left out (`suppressed`).

    For what strangers can cause at will (bad requests, refused webhooks): a flood of them is
    counted in full elsewhere, but must not fill a small disk with log lines.
    """

    __slots__ = ("burst", "window_s", "_kinds")

    def __init__(self, burst: int = 10, window_s: float = 10.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._kinds: dict[str, list[float]] = {}  # kind: [window start, logged, suppressed]

    def allow(self, kind: str, now: float) -> int | None:
        """None: leave this one out; else log it, with the number left out since the last."""
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window_s:
            suppressed = int(state[2]) if state is not None else 0
            self._kinds[kind] = [now, 1, 0]
            return suppressed
        if state[1] < self.burst:
            state[1] += 1
            return 0
        state[2] += 1
        return None
