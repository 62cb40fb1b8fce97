"""structlog set-up: JSON lines for journald when stdout is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# journald reads a leading <N> as the syslog priority, so `journalctl -p warning` works.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}


def _syslog_prefix(_logger: object, method: str, event_dict: dict) -> dict:
    event_dict["_priority"] = _PRIORITY.get(method, 6)
    return event_dict


class _JournalRenderer:
    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: object, method: str, event_dict: dict) -> str:
        priority = event_dict.pop("_priority", 6)
        return f"<{priority}>{self._json(logger, method, event_dict)}"


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog (and route stdlib logging from libraries through it)."""
    if json is None:
        json = not sys.stdout.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        renderer: object = _JournalRenderer()
        processors = [*shared, structlog.processors.format_exc_info, _syslog_prefix, renderer]
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries (aiohttp, paho, asyncio) log through stdlib logging: keep them to warnings.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, _LEVELS[level]))
