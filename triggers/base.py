"""The contract every trigger source implements, and the supervisor that keeps it running."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import msgspec
import structlog

from daemon.backoff import Backoff

log = structlog.get_logger("lambdaemon.triggers")


class Accepted(msgspec.Struct, frozen=True):
    """An event committed as a `queued` invocation (or found already committed)."""

    invocation_id: str
    created: bool  # False when the dedupe key matched an existing invocation


class Emit(Protocol):
    """What a source hands its events to. Every method returns only after the commit."""

    async def __call__(
        self,
        function: str,
        event: Any,
        *,
        trigger: str,
        trigger_id: str,
        dedupe_key: str | None = None,
        extra_sql: Any = None,
    ) -> Accepted:
        """Commit `event` (JSON-able, or JSON bytes) as a queued async invocation of `function`.

        `trigger` is the source kind (cron, mqtt, files, webhook); `trigger_id` names the
        trigger (`function#index`). A `dedupe_key` already stored returns the existing id with
        created=False. `extra_sql(conn)` runs inside the same transaction (cron marks its fire
        there). Raises StoreUnavailableError when nothing can be stored: do not acknowledge.
        """
        ...

    async def wait_final(self, invocation_id: str) -> str:
        """Wait until the invocation has a final status (after all retries); return it."""
        ...

    async def invoke_sync(
        self,
        function: str,
        event: bytes,
        *,
        trigger: str,
        trigger_id: str | None = None,
    ) -> tuple[str, Any]:
        """Run a synchronous invocation now; return (invocation id, daemon.models.Outcome).

        Raises daemon.errors.QueueFullError when the function's wait queue is full.
        """
        ...


class TriggerSource(Protocol):
    """A source of events. `run` runs until cancelled and releases everything in `finally`."""

    name: str

    async def run(self, emit: Emit) -> None: ...


async def supervise(source: TriggerSource, emit: Emit, *, max_backoff_s: float = 60.0) -> None:
    """Run `source` until cancelled; restart it with capped, jittered backoff when it fails."""
    backoff = Backoff(1.0, max_backoff_s, jitter=(0.5, 1.0))
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await source.run(emit)
            log.warning("trigger_source_returned", source=source.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("trigger_source_failed", source=source.name, error=repr(exc), exc_info=True)
        if asyncio.get_running_loop().time() - started > 60:
            backoff.reset()  # it ran fine for a while: start the backoff over
        wait = backoff.next()
        log.info("trigger_source_restarting", source=source.name, in_s=round(wait, 2))
        await asyncio.sleep(wait)
