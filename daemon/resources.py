"""Running short of descriptors: a higher NOFILE limit at start, and quiet pauses of accept().

- `raise_nofile_limit()`: systemd and most shells start a process with a soft limit of 1024
  descriptors, which about a thousand idle connections use up; every worker start then fails
  (EMFILE). The soft limit is raised to the hard one (systemd's unit sets both, LimitNOFILE=).
- `LoopExceptionHandler`: when accept() fails with EMFILE/ENFILE/ENOBUFS/ENOMEM, asyncio's
  selector loop stops accepting for a second (connections wait in the listen backlog) and reports
  it through the loop's exception handler, by default an ERROR with a traceback, for every failed
  accept: under a flood of connections that fills a small disk with the same traceback. This
  handler logs it as `accept_paused` (warning, no traceback, at most once per PAUSE_LOG_S with the
  count of the pauses since), and everything else as the default handler would. uvloop (libuv)
  accepts and closes connections it has no descriptor for instead, and reports nothing.

Log events: nofile_limit (info, at start), nofile_limit_not_raised (warning), accept_paused.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import time
from asyncio import constants
from typing import Any

import structlog

log = structlog.get_logger("lambdaemon.resources")

PAUSE_LOG_S = 10.0
_SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit and log both once; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("nofile_limit", soft=soft, hard=hard, raised_from=None)
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # a seccomp filter without setrlimit, say
        log.warning("nofile_limit_not_raised", soft=soft, hard=hard, error=str(exc))
        return soft, hard
    log.info("nofile_limit", soft=hard, hard=hard, raised_from=soft)
    return hard, hard


class LoopExceptionHandler:
    """The daemon's loop exception handler: `loop.set_exception_handler(LoopExceptionHandler())`.

    `paused` counts accept() pauses for want of a resource since start (for tests and metrics).
    """

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.paused = 0
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not _accept_shortage(context, exc):
            loop.default_exception_handler(context)
            return
        self.paused += 1
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < PAUSE_LOG_S:
            return
        assert isinstance(exc, OSError)
        sock = context.get("socket")
        log.warning(
            "accept_paused",
            error=str(exc),
            errno=errno.errorcode.get(exc.errno or 0, exc.errno),
            listener=_address(sock),
            pauses=self._unlogged,  # since the last line
            retry_in_s=constants.ACCEPT_RETRY_DELAY,
        )
        self._logged_at, self._unlogged = now, 0


def _accept_shortage(context: dict[str, Any], exc: object) -> bool:
    return (
        isinstance(exc, OSError)
        and exc.errno in _SHORTAGE_ERRNOS
        and "socket" in context
        and "accept" in str(context.get("message", ""))
    )


def _address(sock: Any) -> str | None:
    try:
        host, port = sock.getsockname()[:2]
    except (AttributeError, OSError, TypeError, ValueError):
        return None
    return f"{host}:{port}"
