"""structlog set-up: JSON lines for journald when stdout is not a terminal, console otherwise.

The JSON path is on every invocation's hot path (two events each), so it renders with msgspec
straight to bytes and writes them with one unbuffered write per line: no str round trip, and a
crash never loses lines sitting in a buffer. Libraries that log through stdlib `logging`
(aiohttp, paho, asyncio) come out as the same JSON lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, BinaryIO

import msgspec
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# journald reads a leading <N> as the syslog priority, so `journalctl -p warning` works.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}
_encoder = msgspec.json.Encoder(enc_hook=str)  # anything exotic (paths, exceptions) as text


def _render_journal(_logger: object, method: str, event_dict: dict[str, Any]) -> bytes:
    return b"<%d>%s" % (_PRIORITY.get(method, 6), _encoder.encode(event_dict))


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


def configure_logging(level: str = "info", *, json: bool | None = None,
                      stream: BinaryIO | None = None) -> None:
    """Configure structlog, and route stdlib logging from libraries through it."""
    if json is None:
        json = not sys.stdout.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        out = stream or sys.stdout.buffer
        processors = [*shared, structlog.processors.format_exc_info, _render_journal]
        factory: Any = structlog.BytesLoggerFactory(out)
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries are kept to warnings unless the daemon itself runs at debug.
    root = logging.getLogger()
    root.handlers[:] = [_ForeignHandler()]
    root.setLevel(max(logging.WARNING, _LEVELS[level]))
