"""Accepted events -> per-function lanes -> the worker pool -> the invocation record.

Each function has a lane: at most `concurrency` invocations run at once; synchronous callers
wait in a bounded FIFO (they are rejected when it is full), accepted asynchronous invocations
wait in the lane's backlog (they are already durable, so that wait is unbounded).
Synchronous callers go first when a slot frees up: someone is holding a connection open.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import structlog

from daemon.config import FunctionConfig
from daemon.errors import LambdaemonError, QueueFullError
from daemon.models import FINAL_STATUSES, InvokeRequest, Outcome, Status
from daemon.pool import WorkerPool
from daemon.store import NewInvocation, QueuedInvocation, Store
from triggers.base import Accepted

log = structlog.get_logger("lambdaemon.dispatcher")
_json = msgspec.json.Encoder()


class UnknownFunctionError(LambdaemonError, KeyError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"function {name!r} is not configured")


def new_invocation_id() -> str:
    return str(uuid.uuid4())


def to_json(event: Any) -> bytes:
    """An event as JSON bytes; bytes are taken to be JSON already."""
    return event if isinstance(event, bytes) else _json.encode(event)


class _Backlogged(msgspec.Struct):
    id: str
    event: bytes
    attempt: int
    trigger: str


class _Lane:
    """One function's slots, its waiting synchronous callers and its async backlog."""

    def __init__(self, fn: FunctionConfig) -> None:
        self.fn = fn
        self.running = 0
        self.sync_waiters: deque[asyncio.Future[None]] = deque()
        self.backlog: deque[_Backlogged] = deque()


class Dispatcher:
    """Owns the path from an accepted event to its final record."""

    def __init__(self, store: Store, pool: WorkerPool, functions: Mapping[str, FunctionConfig]) -> None:
        self._store = store
        self._pool = pool
        self._lanes = {name: _Lane(fn) for name, fn in functions.items()}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._final_waiters: dict[str, list[asyncio.Future[str]]] = {}
        self._paused = False  # set while draining: nothing new starts

    @property
    def functions(self) -> dict[str, FunctionConfig]:
        return {name: lane.fn for name, lane in self._lanes.items()}

    def function(self, name: str) -> FunctionConfig:
        lane = self._lanes.get(name)
        if lane is None:
            raise UnknownFunctionError(name)
        return lane.fn

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            name: {"running": lane.running, "waiting": len(lane.sync_waiters), "backlog": len(lane.backlog)}
            for name, lane in self._lanes.items()
        }

    # --- start-up -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Settle what a previous run left behind, then resume every queued invocation."""
        recovery = await self._store.recover(time.time())
        resumed = orphaned = 0
        after: tuple[float, str] | None = None
        while True:
            page = await self._store.load_queued(limit=1000, after=after)
            if not page:
                break
            for row in page:
                if self._enqueue(row):
                    resumed += 1
                else:
                    orphaned += 1
            after = (page[-1].queued_at, page[-1].id)
        log.info(
            "dispatcher_recovered", resumed=resumed, requeued_after_crash=len(recovery.requeued),
            crashed=len(recovery.crashed), orphaned=orphaned,
        )

    def _enqueue(self, row: QueuedInvocation) -> bool:
        lane = self._lanes.get(row.function)
        if lane is None:
            log.warning("invocation_orphaned", invocation_id=row.id, function=row.function)
            return False
        lane.backlog.append(_Backlogged(row.id, row.event, row.attempt, row.trigger))
        self._pump(lane)
        return True

    # --- intake -------------------------------------------------------------------------------

    async def __call__(
        self, function: str, event: Any, *, trigger: str, trigger_id: str,
        dedupe_key: str | None = None, extra_sql: Callable[..., None] | None = None,
        parent_id: str | None = None,
    ) -> Accepted:
        """Emit: commit an asynchronous invocation, then hand it to its lane."""
        lane = self._lanes.get(function)
        if lane is None:
            raise UnknownFunctionError(function)
        body = to_json(event)
        inv = NewInvocation(
            id=new_invocation_id(), function=function, function_version=lane.fn.version,
            trigger=trigger, invocation_type="async", event=body, queued_at=time.time(),
            trigger_id=trigger_id, dedupe_key=dedupe_key, parent_id=parent_id,
        )
        invocation_id, created = await self._store.insert(inv, extra_sql)
        if created:
            log.debug("invocation_queued", invocation_id=invocation_id, function=function, trigger=trigger)
            lane.backlog.append(_Backlogged(invocation_id, body, 0, trigger))
            self._pump(lane)
        return Accepted(invocation_id=invocation_id, created=created)

    accept = __call__

    async def invoke_sync(
        self, function: str, event: bytes, *, trigger: str, invoked_arn: str | None = None,
        client_context: str | None = None, trigger_id: str | None = None,
        invocation_id: str | None = None,
    ) -> tuple[str, Outcome]:
        """Run one synchronous invocation and return (id, outcome); the caller owns retries.

        Raises QueueFullError when the function's wait queue is full.
        """
        lane = self._lanes.get(function)
        if lane is None:
            raise UnknownFunctionError(function)
        await self._acquire_sync_slot(lane)
        invocation_id = invocation_id or new_invocation_id()
        try:
            now = time.time()
            inserted = self._spawn(self._store.insert(NewInvocation(
                id=invocation_id, function=function, function_version=lane.fn.version,
                trigger=trigger, invocation_type="sync", event=event, queued_at=now,
                trigger_id=trigger_id, status=Status.RUNNING, attempt=1, started_at=now,
            )))
            request = InvokeRequest(invocation_id, event, invoked_arn or lane.fn.arn, client_context)
            outcome = await self._run(lane.fn, request, attempt=1, on_start=None)
            self._spawn(self._record_sync(inserted, invocation_id, outcome))
            return invocation_id, outcome
        finally:
            self._release(lane)

    async def _record_sync(self, inserted: asyncio.Task[Any], invocation_id: str, outcome: Outcome) -> None:
        try:
            await inserted  # the finish must land after the row exists
            await self._store.finish(invocation_id, 1, outcome)
        except Exception as exc:  # recorded best effort: the caller already has its answer
            log.error("invocation_record_failed", invocation_id=invocation_id, error=str(exc))

    async def wait_final(self, invocation_id: str) -> str:
        """Wait until `invocation_id` reaches a final status and return it."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._final_waiters.setdefault(invocation_id, []).append(future)
        try:
            await self._store.barrier()
            status = await self._store.status_of(invocation_id)
            if status in FINAL_STATUSES:
                return status
            if status is None:
                raise KeyError(invocation_id)
            return await future
        finally:
            waiters = self._final_waiters.get(invocation_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._final_waiters.pop(invocation_id, None)

    # --- lanes --------------------------------------------------------------------------------

    async def _acquire_sync_slot(self, lane: _Lane) -> None:
        if lane.running < lane.fn.concurrency and not lane.sync_waiters and not self._paused:
            lane.running += 1
            return
        if len(lane.sync_waiters) >= lane.fn.queue_size:
            raise QueueFullError(lane.fn.name, lane.fn.queue_size)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.sync_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(lane)  # the slot was granted as we were cancelled: give it back
            else:
                lane.sync_waiters.remove(waiter)
            raise

    def _release(self, lane: _Lane) -> None:
        lane.running -= 1
        self._pump(lane)

    def _pump(self, lane: _Lane) -> None:
        """Hand free slots to waiting callers first, then to the async backlog."""
        if self._paused:
            return
        while lane.running < lane.fn.concurrency:
            if lane.sync_waiters:
                waiter = lane.sync_waiters.popleft()
                if waiter.done():
                    continue
                lane.running += 1
                waiter.set_result(None)
            elif lane.backlog:
                item = lane.backlog.popleft()
                lane.running += 1
                self._spawn(self._run_async(lane, item))
            else:
                return

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- running ------------------------------------------------------------------------------

    async def _run_async(self, lane: _Lane, item: _Backlogged) -> None:
        fn, attempt = lane.fn, item.attempt + 1
        try:
            request = InvokeRequest(item.id, item.event, fn.arn)
            # Committed before the handler can start, so a crash mid-run is always seen as a
            # started attempt (and counted) when the daemon recovers.
            await self._store.mark_running(item.id, attempt, time.time(), None)

            def on_start(pid: int, started_at: float) -> None:
                self._store.mark_running(item.id, attempt, started_at, pid)

            outcome = await self._run(fn, request, attempt=attempt, on_start=on_start)
            # Shielded so a shutdown that cancels us still records how the attempt ended.
            await asyncio.shield(self._store.finish(item.id, attempt, outcome))
            self._resolve_final(item.id, outcome.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The row stays queued or running; the next start recovers it. Say so loudly.
            log.error("invocation_not_recorded", invocation_id=item.id, function=fn.name, error=str(exc))
        finally:
            self._release(lane)

    async def _run(self, fn: FunctionConfig, request: InvokeRequest, *, attempt: int,
                   on_start: Callable[[int, float], None] | None) -> Outcome:
        bound = log.bind(invocation_id=request.invocation_id, function=fn.name)
        bound.info("invocation_started", attempt=attempt)
        outcome = await self._pool.invoke(fn, request, on_start)
        bound.info(
            "invocation_finished", status=outcome.status.value, attempt=attempt,
            duration_ms=round(outcome.duration_ms, 3), error_type=outcome.error_type,
        )
        return outcome

    def _resolve_final(self, invocation_id: str, status: Status) -> None:
        for future in self._final_waiters.pop(invocation_id, []):
            if not future.done():
                future.set_result(status.value)

    # --- shutdown -----------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Start nothing new; wait up to `timeout_s` for running work; cancel the rest.

        Returns how many tasks were cancelled. Backlogged invocations stay queued in the store.
        """
        self._paused = True
        for lane in self._lanes.values():
            lane.backlog.clear()
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            log.info("dispatcher_draining", in_flight=len(pending), timeout_s=timeout_s)
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("dispatcher_drain_cancelled", cancelled=len(pending))
        return len(pending)
