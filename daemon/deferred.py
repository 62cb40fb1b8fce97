"""Sync calls answered while the store could not take their records: kept, bounded, written later.

A sync call's caller has its answer before its record is written (daemon/dispatcher.py). When
that write fails because the store cannot take writes (a full disk, an I/O error), the record
waits here, in memory, and is written once the store takes writes again, as an async attempt's
outcome waits in Dispatcher._settle_until_stored: the first waiting records are tried again after
a backoff (0.5 s doubling to 15 s), and as soon as one gets through the rest follow.

Bounded: at most MAX_RECORDS records or MAX_BYTES of their events, results and logs, whichever
comes first; a record past that is dropped and counted (sync_records_dropped), since memory is
the next thing a long outage would fill. The counts are in /health's store section. Records still
waiting when the daemon exits are lost (sync_records_lost says how many): they lived in memory.

Log events: sync_records_deferred (warning, the first of an outage), sync_records_written
(info, when the last waiting record is written), sync_records_dropped (error, at most one line
every DROP_LOG_EVERY_S), sync_records_lost, invocation_record_failed (a record the store refused
for another reason than being unavailable: it is not tried again).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from typing import Any

import msgspec
import structlog

from daemon.backoff import Backoff
from daemon.errors import StoreUnavailableError
from daemon.models import Outcome
from daemon.store.sqlite import NewInvocation, Store

log = structlog.get_logger("lambdaemon.dispatcher")

MAX_RECORDS = 10_000
MAX_BYTES = 32 * 1024 * 1024
RECORD_OVERHEAD = 512  # the rest of a record's fields and its Python objects, roughly
CHUNK = 256  # records enqueued to the store at once while catching up
DROP_LOG_EVERY_S = 60.0
CLOSE_TIMEOUT_S = 5.0  # the last try at shutdown
_BACKOFF = Backoff(0.5, 15.0)


class _Waiting(msgspec.Struct, frozen=True):
    inv: NewInvocation
    outcome: Outcome
    size: int


class DeferredRecords:
    """The sync records waiting for the store; made on the loop that writes them."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: deque[_Waiting] = deque()
        self.bytes = 0  # what the waiting records hold
        self.dropped = 0  # records given up on because the bounds were reached, since start
        self._task: asyncio.Task[None] | None = None
        self._since = 0.0  # when the current outage's first record came
        self._deferred = 0  # records deferred in the current outage
        self._dropped_logged_at = -DROP_LOG_EVERY_S
        self._closed = False
        self._loop = asyncio.get_running_loop()

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def report(self) -> dict[str, Any]:
        """For /health's store section."""
        return {
            "sync_records_pending": len(self._waiting),
            "sync_records_pending_mb": round(self.bytes / (1024 * 1024), 3),
            "sync_records_dropped": self.dropped,
        }

    def add(self, inv: NewInvocation, outcome: Outcome) -> None:
        """Keep a sync call's record whose write failed because the store is unavailable."""
        if self._closed:  # the drain is over: nothing would write it
            log.error("invocation_record_failed", invocation_id=inv.id, error="store closed")
            return
        size = len(inv.event) + len(outcome.payload or b"") + len(outcome.logs or "")
        size += RECORD_OVERHEAD
        if len(self._waiting) >= MAX_RECORDS or self.bytes + size > MAX_BYTES:
            self._drop(inv)
            return
        if not self._waiting and self._task is None:
            self._since, self._deferred = time.time(), 0
            log.warning(
                "sync_records_deferred",
                invocation_id=inv.id,
                reason="the store cannot take writes; records wait in memory until it can",
                max_records=MAX_RECORDS,
                max_mb=MAX_BYTES // (1024 * 1024),
            )
        self._waiting.append(_Waiting(inv, outcome, size))
        self.bytes += size
        self._deferred += 1
        if self._task is None:
            self._task = self._loop.create_task(self._write_all(), name="sync-records")

    async def close(self) -> None:
        """At shutdown: one last try (bounded), then say how many are lost; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._waiting:
            with contextlib.suppress(TimeoutError, StoreUnavailableError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    while self._waiting and await self._write_chunk():
                        pass
        if self._waiting:
            log.error(
                "sync_records_lost",
                records=len(self._waiting),
                reason="the daemon stopped before the store could take them",
            )

    def _drop(self, inv: NewInvocation) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged_at >= DROP_LOG_EVERY_S:
            self._dropped_logged_at = now
            log.error(
                "sync_records_dropped",
                invocation_id=inv.id,
                dropped=self.dropped,
                pending=len(self._waiting),
                pending_mb=round(self.bytes / (1024 * 1024), 1),
                reason="the store has been unavailable for long and the waiting records reached"
                f" their bound ({MAX_RECORDS} records or {MAX_BYTES // (1024 * 1024)} MB)",
            )

    async def _write_all(self) -> None:
        try:
            for tries in itertools.count():
                while self._waiting and await self._write_chunk():
                    pass
                if not self._waiting:
                    log.info(
                        "sync_records_written",
                        records=self._deferred,
                        after_s=round(time.time() - self._since, 1),
                    )
                    return
                await asyncio.sleep(_BACKOFF.delay_s(tries))
        finally:
            self._task = None

    async def _write_chunk(self) -> bool:
        """Write the first CHUNK waiting records; False when the store is still unavailable."""
        chunk = list(itertools.islice(self._waiting, CHUNK))
        results = await asyncio.gather(
            *(self._store.record_sync_final(w.inv, w.outcome) for w in chunk),
            return_exceptions=True,
        )
        kept = []
        for waiting, result in zip(chunk, results, strict=True):
            self._waiting.popleft()  # `chunk`: only add() appended meanwhile, at the other end
            if isinstance(result, StoreUnavailableError):
                kept.append(waiting)
                continue
            self.bytes -= waiting.size
            if isinstance(result, BaseException):  # not the store's state: trying again won't help
                log.error(
                    "invocation_record_failed", invocation_id=waiting.inv.id, error=repr(result)
                )
        self._waiting.extendleft(reversed(kept))
        return not kept
