"""Whether the pool can start workers: failed starts, for /health, the logs and the retries.

A worker start that fails before the process runs its init (no descriptor for the control socket,
no memory or process for the fork: EMFILE, ENFILE, ENOMEM, EAGAIN) is the daemon's trouble, not
the function's. The call that needed the worker fails at once with WORKER_START_FAILED; the pool
goes `degraded` (GET /health answers 503 with the reason) until a start gets through again, and
tries one on its own after a backoff, so it recovers without waiting for traffic.

A start that fails because the function's code folder is missing or not readable is the
function's own problem (Runtime.InvalidEntrypoint) and leaves the pool healthy.

Log events: worker_start_failed (warning, each failure), pool_degraded (error, on the first
failure, repeated every REPEAT_S while it lasts), pool_restored.
"""

from __future__ import annotations

import errno
import time
from typing import Any

import structlog

from daemon.backoff import Backoff
from daemon.systemd import notify

log = structlog.get_logger("lambdaemon.pool")

WORKER_START_FAILED = "Lambdaemon.WorkerStartFailed"
ENTRYPOINT_ERROR = "Runtime.InvalidEntrypoint"
RETRY_FIRST_S = 1.0
RETRY_CAP_S = 30.0
REPEAT_S = 60.0
# Errors of the function's code folder (the worker's working directory), not of the daemon.
_ENTRYPOINT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES})


def describe(exc: BaseException) -> str:
    """The exception as an error message: an OSError's own text, else its type and text."""
    if isinstance(exc, OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def start_error(function: str, exc: BaseException) -> tuple[str, str]:
    """(error type, message) of a start that failed with `exc` before the worker ran."""
    if isinstance(exc, OSError) and exc.errno in _ENTRYPOINT_ERRNOS:
        return ENTRYPOINT_ERROR, f"Cannot start a worker: {exc}"
    return WORKER_START_FAILED, f"Cannot start a worker for function {function!r}: {describe(exc)}"


class StartHealth:
    """Failed worker starts in a row, and since when; `report()` is the pool's part of /health."""

    def __init__(self) -> None:
        self.error = ""  # empty: healthy
        self.since = 0.0
        self.failures = 0  # in a row
        self.total_failures = 0
        self._logged_at = 0.0
        self._backoff = Backoff(RETRY_FIRST_S, RETRY_CAP_S)

    @property
    def degraded(self) -> bool:
        return bool(self.error)

    def failed(self, function: str, error: str) -> float:
        """Count a start that failed with `error`; the delay before the pool tries one itself."""
        now = time.time()
        self.failures += 1
        self.total_failures += 1
        log.warning("worker_start_failed", function=function, error=error, failures=self.failures)
        if not self.degraded:
            self.since = now
        if not self.degraded or now - self._logged_at >= REPEAT_S:
            self._logged_at = now
            # Loud: calls fail (sync callers get the error, async ones wait for their retries).
            log.error(
                "pool_degraded",
                reason="workers_cannot_start",
                error=error,
                failures=self.failures,
                for_s=round(now - self.since, 1),
            )
            notify(f"STATUS=degraded: workers cannot start: {error}")
        self.error = error
        return self.retry_delay_s()

    def retry_delay_s(self) -> float:
        """How long the pool waits before it tries a start of its own (doubling per failure)."""
        return self._backoff.delay_s(max(self.failures - 1, 0))

    def succeeded(self) -> None:
        """A worker started: the pool is healthy again."""
        if self.degraded:
            after_s = round(time.time() - self.since, 1)
            log.warning("pool_restored", failures=self.failures, after_s=after_s)
            notify("STATUS=serving")
        self.error, self.failures = "", 0

    def report(self) -> dict[str, Any]:
        """`status` ok or degraded (with `reason`, `error`, `since`), and the failure counts."""
        counts = {"failed_starts": self.failures, "failed_starts_total": self.total_failures}
        if not self.degraded:
            return {"status": "ok", **counts}
        return {
            "status": "degraded",
            "reason": "workers_cannot_start",
            "error": self.error,
            "since": self.since,
            **counts,
        }
