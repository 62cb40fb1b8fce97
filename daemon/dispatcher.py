"""Accepted events -> per-function lanes (daemon/lanes.py) -> the worker pool -> the record.

An async attempt that fails, times out or crashes is retried by daemon/retry.py's policy: the
row is committed `queued` with its `next_attempt_at` and a timer puts it back in the backlog
then (a restart re-arms the timers from the store). Out of attempts or too old, it is
dead-lettered: it keeps its final status and gains a reason. Only then is it final.

Shutdown (drain) and reload (update) never drop an accepted invocation: what has not started
stays queued in the store; an attempt the drain has to cancel is recorded as interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import msgspec
import structlog

from daemon import logs
from daemon.backoff import Backoff
from daemon.batches import TRIGGER as BATCH_TRIGGER
from daemon.batches import BatchRunner
from daemon.config import FunctionConfig
from daemon.deferred import DeferredRecords
from daemon.destinations.routing import Router
from daemon.errors import (
    BatchReplayError,
    ShuttingDownError,
    StoreUnavailableError,
    UnknownFunctionError,
)
from daemon.lanes import Backlogged, Lane, Lanes
from daemon.models import FINAL_STATUSES, InvokeRequest, Outcome, Status, new_id
from daemon.pool import WorkerPool
from daemon.retry import EVENT_AGE_EXCEEDED, Verdict, after_failure, too_old
from daemon.store import records
from daemon.store.fleet import TakenOver
from daemon.store.settle import Routed
from daemon.store.sqlite import (
    INTERRUPTED_ERROR_TYPE,
    INTERRUPTED_MESSAGE,
    NewInvocation,
    QueuedInvocation,
    Store,
)
from daemon.tail import LogHub
from daemon.versions import DeployError, Versions, invoked_arn
from triggers.base import EVENT_REJECTED, Accepted, rejected_event

log = structlog.get_logger("lambdaemon.dispatcher")


# Seconds before writing to a store that failed again, by tries: 0.5 s doubling up to 15 s.
_STORE_BACKOFF = Backoff(0.5, 15.0)


# A sync call's `running` row, and an async attempt's worker pid, are written only for an
# invocation still running after this long: most finish first and are written once, finished.
VISIBLE_AFTER_S = 0.25
# Marks written ahead (Dispatcher._mark_ahead): per lane at most MARK_AHEAD_PER_SLOT per
# concurrency slot and MARK_AHEAD in all, and only while its attempts take under QUICK_MS on
# average, so that a marked item waits for its start about as long as a commit takes.
MARK_AHEAD = 64
MARK_AHEAD_PER_SLOT = 8
QUICK_MS = 5.0
# A fleet's node keeps this many waiting invocations per concurrency slot of a function when it
# releases the rest of its backlog to idle nodes (release_excess).
KEEP_PER_SLOT = 2
# A fenced node (daemon/fleet.py) looks at an invocation again this long after it could not start.
FENCE_RETRY_S = 0.5
_json = msgspec.json.Encoder()


def to_json(event: Any) -> bytes:
    """An event as JSON bytes; bytes are taken to be JSON already."""
    return event if isinstance(event, bytes) else _json.encode(event)


class Dispatcher:
    """Owns the path from an accepted event to its final record; made on the loop it serves."""

    def __init__(
        self,
        store: Store,
        pool: WorkerPool,
        functions: Mapping[str, FunctionConfig],
        *,
        on_outbox: Callable[[], None] | None = None,
        versions: Versions | None = None,
    ) -> None:
        self._store = store
        # Published versions and aliases; without the service's, an empty set beside the store.
        self.versions = versions or Versions(store, store.path.parent)
        self._pool = pool
        self._on_outbox = on_outbox  # called when a destination record joins the outbox
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        self._batches = BatchRunner(self)
        self._lanes = Lanes(functions, self._start, self._loop, self._start_batch)
        # Where final outcomes go; the store calls it inside their final writes.
        self._router = Router(self._function_of)
        self._running: set[asyncio.Task[Any]] = set()  # invocations being run, async and sync
        self._in_flight: set[str] = set()  # ids of the async ones
        self._tasks: set[asyncio.Task[Any]] = set()  # their records being written, and the like
        self._stopping = False
        self._final_waiters: dict[str, list[asyncio.Future[str]]] = {}
        self.log_hub = LogHub()  # followers of functions' logs
        # Sync records the store could not take yet (a full disk): written once it can.
        self.deferred = DeferredRecords(store)
        # Whether this node must start no attempt now (daemon/fleet.py's fence).
        self.fenced: Callable[[], bool] = lambda: False

    @property
    def functions(self) -> dict[str, FunctionConfig]:
        return {name: lane.fn for name, lane in self._lanes.items()}

    def function(self, name: str) -> FunctionConfig:
        lane = self._lanes.get(name)
        if lane is None:
            raise UnknownFunctionError(name)
        return lane.fn

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: lane.stats() for name, lane in self._lanes.items()}

    def lanes(self) -> dict[str, Lane]:
        """Every lane by function name, those a reload removed too (their counts stay)."""
        return {**self._lanes.retired, **self._lanes}

    def load(self) -> dict[str, Any]:
        """What this node runs and holds now, in all and per function (GET /v1/nodes)."""
        functions: dict[str, dict[str, int]] = {}
        for name, lane in self._lanes.items():
            waiting = len(lane.backlog) + sum(len(g.items) for g in lane.gathering.values())
            functions[name] = {
                "running": lane.running,
                "queued": waiting + len(lane.retry_timers),
                "free": max(0, lane.fn.concurrency - lane.running - waiting),
            }
        totals = {
            key: sum(f[key] for f in functions.values()) for key in ("running", "queued", "free")
        }
        return {**totals, "functions": functions}

    def free_slots(self) -> dict[str, int]:
        """Per function, the attempts it could start now that nothing waits for: what this
        node may take over from a dead one (daemon/fleet.py)."""
        if self._stopping:
            return {}
        return {name: f["free"] for name, f in self.load()["functions"].items()}

    def release_excess(self, spare: dict[str, int]) -> list[tuple[str, Backlogged]]:
        """Take out of the lanes what other nodes could run now: per function, up to
        `spare[function]` (the free slots of the other live nodes) of the newest waiting
        invocations past KEEP_PER_SLOT per concurrency slot, never one marked running ahead
        or gathered for a batch. The caller releases their rows (daemon/fleet.py) and puts
        back any that could not be (put_back)."""
        if self._stopping:
            return []
        taken: list[tuple[str, Backlogged]] = []
        for name, lane in self._lanes.items():
            room = min(spare.get(name, 0), len(lane.backlog) - KEEP_PER_SLOT * lane.fn.concurrency)
            if room <= 0 or lane.paused or lane.gathering:
                continue
            kept: list[Backlogged] = []
            while room > 0 and len(lane.backlog) > KEEP_PER_SLOT * lane.fn.concurrency:
                item = lane.backlog.pop()  # the newest; the lane starts from the other end
                if item.id in lane.marked_ahead:
                    kept.append(item)
                    continue
                lane.budget.release(item)
                taken.append((name, item))
                room -= 1
            lane.backlog.extend(reversed(kept))
        return taken

    def put_back(self, items: list[tuple[str, Backlogged]]) -> None:
        """Into their lanes again: invocations release_excess took out that stay this node's."""
        for name, item in items:
            if (lane := self._lanes.get(name)) is not None:
                lane.push(item)

    @property
    def router(self) -> Router:
        return self._router

    def adopt(self, taken: TakenOver) -> None:
        """Run what this node took over from a dead one (daemon/store/fleet.py take_over)."""
        for invocation_id, reason in taken.recovery.dead_lettered:
            log.warning(
                "invocation_dead_lettered",
                invocation_id=invocation_id,
                reason=reason,
                status=Status.CRASHED.value,
            )
        for routed in taken.recovery.routed:
            self._routed(routed)
        for row in taken.queued:
            self._enqueue(row)

    def worker_stats(self) -> dict[str, dict[str, int]]:
        """Per function: its idle and busy workers (the pool's count)."""
        return self._pool.stats()

    # --- start-up -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Settle what a previous run left behind, then resume every queued invocation.

        Retries whose time has come (or passed while the daemon was down) run as soon as a
        slot is free; later ones wait for their timer.
        """
        now = time.time()
        recovery = await self._store.recover(now, self.recovery_policy(now), self._router)
        for invocation_id, reason in recovery.dead_lettered:
            log.warning(
                "invocation_dead_lettered",
                invocation_id=invocation_id,
                reason=reason,
                status=Status.CRASHED.value,
            )
        for routed in recovery.routed:  # its new invocations are queued rows: loaded below
            self._routed(routed, enqueue=False)
        resumed, orphaned = await self._resume_queued()
        log.info(
            "dispatcher_recovered",
            resumed=resumed,
            requeued_after_crash=len(recovery.requeued),
            crashed=len(recovery.crashed),
            dead_lettered=len(recovery.dead_lettered),
            retrying=sum(len(lane.retry_timers) for lane in self._lanes.values()),
            orphaned=orphaned,
        )

    def recovery_policy(self, now: float) -> Callable[[str, int, int, float], Verdict]:
        # Runs in the store's database thread: it only reads the (unchanging) lanes.
        def decide(function: str, attempt: int, retry_base: int, age_from: float) -> Verdict:
            lane = self._lanes.get(function)
            if lane is None:  # stays queued, and runs if the function is configured again
                return Verdict(next_attempt_at=now)
            return after_failure(
                lane.fn, attempt=attempt, retry_base=retry_base, age_from=age_from, now=now
            )

        return decide

    def _enqueue(self, row: QueuedInvocation) -> bool:
        lane = self._lanes.get(row.function)
        if lane is None:
            log.warning("invocation_orphaned", invocation_id=row.id, function=row.function)
            return False
        item = Backlogged(
            row.id,
            row.event,
            row.attempt,
            row.trigger,
            row.retry_base,
            row.age_from,
            row.function_version,
            row.trigger_id,
        )
        if row.next_attempt_at is not None and row.next_attempt_at > time.time():
            lane.push_at(item, row.next_attempt_at)
        else:
            lane.push(item)
        return True

    async def _resume_queued(
        self, functions: set[str] | None = None, opened_at: float = 0.0
    ) -> tuple[int, int]:
        """Hand the store's queued rows (of `functions`; default all) to their lanes.

        With `functions` (lanes a reload opened at `opened_at`), rows accepted since then and
        invocations already in hand are skipped: they are in a lane already. Returns (resumed,
        orphaned).
        """
        resumed = orphaned = 0
        after: tuple[float, str] | None = None
        while True:
            page = await self._store.load_queued(limit=1000, after=after)
            if not page:
                return resumed, orphaned
            # Running, in a backlog or on a retry timer: a second copy would run it twice.
            held = self._in_flight | self._lanes.holding(functions) if functions else set()
            for row in page:
                if functions is not None and (
                    row.function not in functions or row.queued_at >= opened_at or row.id in held
                ):
                    continue
                if self._enqueue(row):
                    resumed += 1
                else:
                    orphaned += 1
            after = (page[-1].queued_at, page[-1].id)

    # --- reload -------------------------------------------------------------------------------

    async def update(self, functions: Mapping[str, FunctionConfig]) -> None:
        """Adopt a reloaded config's functions without dropping queued or running invocations.

        Running invocations finish on the settings they started with; what starts next uses
        the new ones. A removed function's lane starts nothing more and refuses new events
        (its queued rows stay in the store); a reload that brings it back resumes them.
        """
        opened = self._lanes.reconfigure(functions, UnknownFunctionError)
        taken_back = self._take_back_marks(list(self._lanes.retired.values()))
        if taken_back is not None:  # before their rows can be resumed
            await asyncio.shield(taken_back)
        if opened:
            resumed, _ = await self._resume_queued(set(opened), opened_at=time.time())
            log.info("dispatcher_functions_opened", functions=opened, resumed=resumed)

    # --- intake -------------------------------------------------------------------------------

    async def __call__(
        self,
        function: str,
        event: Any,
        *,
        trigger: str,
        trigger_id: str,
        dedupe_key: str | None = None,
        cron_fire: tuple[str, str] | None = None,
        parent_id: str | None = None,
        qualifier: str | None = None,
    ) -> Accepted:
        """Emit: commit an asynchronous invocation, then hand it to its lane.

        It is bound to the version its qualifier (or its trigger's) names now; a qualifier that
        names nothing is kept as it is, and each attempt fails until it does."""
        lane = self._lanes.get(function)
        if lane is None:
            raise UnknownFunctionError(function)
        body = to_json(event)
        version = "$LATEST"
        qualifier = qualifier or self._trigger_qualifier(lane.fn, trigger_id)
        if qualifier is not None:
            try:
                version = self.versions.resolve(lane.fn, qualifier).fn.version
            except DeployError:
                version = qualifier
        inv = NewInvocation(
            id=new_id(),
            function=function,
            function_version=version,
            trigger=trigger,
            invocation_type="async",
            event=body,
            queued_at=time.time(),
            trigger_id=trigger_id,
            dedupe_key=dedupe_key,
            parent_id=parent_id,
        )
        invocation_id, created = await self._store.insert(inv, cron_fire=cron_fire)
        if created:
            log.debug(
                "invocation_queued", invocation_id=invocation_id, function=function, trigger=trigger
            )
            lane.push(
                Backlogged(invocation_id, body, 0, trigger, 0, inv.queued_at, version, trigger_id)
            )
        return Accepted(invocation_id=invocation_id, created=created)

    accept = __call__

    async def reject(
        self,
        function: str,
        raw: bytes,
        *,
        trigger: str,
        trigger_id: str,
        error: str,
        dedupe_key: str | None = None,
        cron_fire: tuple[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Accepted:
        """Emit.reject: commit the input as a failed, dead-lettered invocation that never ran."""
        lane = self._lanes.get(function)
        inv = NewInvocation(
            id=new_id(),
            function=function,
            function_version=lane.fn.version if lane is not None else "$LATEST",
            trigger=trigger,
            invocation_type="async",
            event=rejected_event(raw, details),
            queued_at=time.time(),
            trigger_id=trigger_id,
            dedupe_key=dedupe_key,
            status=Status.FAILED,
        )
        result = _json.encode({"errorMessage": error, "errorType": EVENT_REJECTED})
        invocation_id, created = await self._store.insert_rejected(
            inv, EVENT_REJECTED, error, result, cron_fire=cron_fire
        )
        if created and lane is not None:  # final at once: failed and dead-lettered
            lane.counts.finish(trigger, Status.FAILED.value)
            lane.counts.dead_letters += 1
        log.warning(
            "event_rejected",
            invocation_id=invocation_id,
            function=function,
            trigger=trigger,
            trigger_id=trigger_id,
            error=error,
            raw_bytes=len(raw),
            created=created,
        )
        return Accepted(invocation_id=invocation_id, created=created)

    async def invoke_sync(
        self,
        function: str,
        event: bytes,
        *,
        trigger: str,
        invoked_arn: str | None = None,
        client_context: str | None = None,
        trigger_id: str | None = None,
        invocation_id: str | None = None,
        target: FunctionConfig | None = None,
    ) -> tuple[str, Outcome]:
        """Run one synchronous invocation and return (id, outcome); the caller owns retries.

        `target`: the version to run (Versions.resolve); else the one the trigger's qualifier
        names, else $LATEST. Raises QueueFullError when the function's wait queue is full,
        ShuttingDownError while draining. An attempt the drain cancels answers (and is
        recorded) as crashed.
        """
        lane = self._lanes.get(function)
        if lane is None:
            raise UnknownFunctionError(function)
        await lane.acquire_sync_slot()
        fn: FunctionConfig | Outcome = target or lane.fn
        version = (target or lane.fn).version
        if target is None and (qualifier := self._trigger_qualifier(lane.fn, trigger_id)):
            fn = self._version_of(lane.fn, qualifier)
            version = fn.version if isinstance(fn, FunctionConfig) else qualifier
        invocation_id = invocation_id or new_id()
        inv = NewInvocation(
            id=invocation_id,
            function=function,
            function_version=version,
            trigger=trigger,
            invocation_type="sync",
            event=event,
            queued_at=time.time(),
            trigger_id=trigger_id,
            status=Status.RUNNING,
            attempt=1,
            started_at=time.time(),
        )
        # Most sync calls finish in milliseconds: they are written once, finished. A call
        # still running after VISIBLE_AFTER_S gets its `running` row, so it shows up
        # while it runs and a daemon crash leaves a record of it.
        running: list[asyncio.Future[Any]] = []
        visible = self._loop.call_later(
            VISIBLE_AFTER_S, lambda: running.append(self._store.insert_nowait(inv))
        )
        try:
            request = InvokeRequest(
                invocation_id, event, invoked_arn or lane.fn.arn, client_context
            )
            run = self._spawn(self._run_sync(fn, inv, request, visible, running), self._running)
            try:
                outcome = await run  # cancelling the caller cancels the run too
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not run.cancelled() or (current is not None and current.cancelling()):
                    raise
                # The drain cancelled the run, which recorded it: the caller hears why.
                outcome = self._interrupted(inv.started_at or inv.queued_at)
            lane.counts.finish(trigger, outcome.status.value)
            return invocation_id, outcome
        finally:
            visible.cancel()
            lane.release()

    async def _run_sync(
        self,
        fn: FunctionConfig | Outcome,
        inv: NewInvocation,
        request: InvokeRequest,
        visible: asyncio.TimerHandle,
        running: list[asyncio.Future[Any]],
    ) -> Outcome:
        try:
            outcome = fn if isinstance(fn, Outcome) else await self._run(fn, request, attempt=1)
        except asyncio.CancelledError:
            visible.cancel()
            outcome = self._interrupted(inv.started_at or inv.queued_at)
            log.warning(
                "invocation_interrupted",
                invocation_id=inv.id,
                function=inv.function,
                attempt=1,
                invocation_type="sync",
                error_message=outcome.error_message,
            )
            # Shielded: recorded as crashed, not left `running` (or missing) for the next start.
            await asyncio.shield(self._record_sync(inv, running[0] if running else None, outcome))
            raise
        visible.cancel()
        if running:
            self._spawn(self._record_sync(inv, running[0], outcome))
        else:  # the usual case, written without a task of its own
            try:
                recorded = self._store.record_finished_nowait(inv, outcome)
            except StoreUnavailableError as exc:  # closed: the caller still gets its answer
                log.error("invocation_record_failed", invocation_id=inv.id, error=str(exc))
            else:
                recorded.add_done_callback(partial(self._recorded, inv, outcome))
        return outcome

    def _recorded(
        self, inv: NewInvocation, outcome: Outcome, recorded: asyncio.Future[None]
    ) -> None:
        # The caller already has its answer; a record the store cannot take now waits for it.
        if recorded.cancelled() or (exc := recorded.exception()) is None:
            return
        if isinstance(exc, StoreUnavailableError):
            self.deferred.add(inv, outcome)
        else:
            log.error("invocation_record_failed", invocation_id=inv.id, error=str(exc))

    async def _record_sync(
        self, inv: NewInvocation, running: asyncio.Future[Any] | None, outcome: Outcome
    ) -> None:
        try:
            if running is None:
                await self._store.record_finished(inv, outcome)
            else:
                # Enqueued after the running row's insert, so it commits after it.
                await self._store.finish(inv.id, 1, outcome)
        except StoreUnavailableError:
            self.deferred.add(inv, outcome)  # written once the store takes writes again
        except LookupError:  # its running row was never written: the store was unavailable
            self.deferred.add(inv, outcome)
        except Exception as exc:  # recorded best effort: the caller already has its answer
            log.error("invocation_record_failed", invocation_id=inv.id, error=str(exc))

    async def wait_final(self, invocation_id: str) -> str:
        """Wait until `invocation_id` reaches a final status and return it."""
        future: asyncio.Future[str] = self._loop.create_future()
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

    # --- dead letters and replays ---------------------------------------------------------------

    async def redrive(self, ids: list[str] | None = None, function: str | None = None) -> list[str]:
        """Queue dead letters again with their original event and a fresh retry budget and age.

        `ids` picks some (None: all, optionally only `function`'s). Dead letters of functions
        no longer configured are left alone. Returns the ids that were queued again.
        """
        rows = await self._store.redrive(ids, function, list(self._lanes))
        for row in rows:
            log.info(
                "invocation_redriven",
                invocation_id=row.id,
                function=row.function,
                attempt=row.attempt,
            )
            self._enqueue(row)
        return [row.id for row in rows]

    async def replay(self, invocation_id: str) -> Accepted:
        """Run a recorded invocation's event again, as a new async invocation linked to it.

        The new row's parent_id is `invocation_id`. Raises KeyError for an unknown id,
        UnknownFunctionError when its function is no longer configured and BatchReplayError for
        a batch invocation (its items are replayed one by one).
        """
        await self._store.barrier()
        record = await self._store.get(invocation_id)
        if record is None:
            raise KeyError(invocation_id)
        if record["trigger"] == BATCH_TRIGGER:  # its event is its items' records, not an event
            raise BatchReplayError(invocation_id)
        accepted = await self.accept(
            record["function"],
            bytes(record["event"]),
            trigger="replay",
            trigger_id=record["trigger_id"] or record["trigger"],
            parent_id=invocation_id,
        )
        log.info(
            "invocation_replayed",
            invocation_id=accepted.invocation_id,
            parent_id=invocation_id,
            function=record["function"],
        )
        return accepted

    # --- lanes --------------------------------------------------------------------------------

    def _start(self, lane: Lane, item: Backlogged) -> None:
        self._in_flight.add(item.id)
        # Its mark written ahead, if any, is this attempt's now: a lane that pauses later takes
        # back only the marks still in lane.marked_ahead.
        ahead = lane.marked_ahead.pop(item.id, None)
        self._spawn(self._run_async(lane, item, ahead and ahead[:2]), self._running)

    def _start_batch(self, lane: Lane, items: list[Backlogged]) -> None:
        self._in_flight.update(item.id for item in items)
        self._spawn(self._batches.run(lane, items), self._running)

    def _spawn(self, coro: Any, tasks: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
        tasks = self._tasks if tasks is None else tasks
        task = self._loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # --- running ------------------------------------------------------------------------------

    async def _run_async(
        self, lane: Lane, item: Backlogged, ahead: tuple[asyncio.Future[None], float] | None
    ) -> None:
        fn, attempt = lane.fn, item.attempt + 1
        released = False
        try:
            if self.fenced():  # this node's lease is in doubt: another node may take it over
                self._lease_in_doubt(lane, item, ahead)
                return
            if item.attempt > item.retry_base and too_old(fn, item.age_from, time.time()):
                # A retry that came due too late (the daemon was down, or the lane was busy).
                settled = await asyncio.shield(
                    self._store.dead_letter_waiting(item.id, EVENT_AGE_EXCEEDED, route=self._router)
                )
                self._dead_lettered(lane, item, item.attempt, settled.status, EVENT_AGE_EXCEEDED)
                self._routed(settled.routed)
                return
            event = item.event
            if event is None:  # waited without it (daemon/lanes.py): read it back
                try:
                    event = await self._store.event_of(item.id)
                except StoreUnavailableError as exc:
                    self._not_started(lane, item, exc)
                    return
                if event is None:
                    raise LookupError(f"invocation {item.id} is not in the store")
            request = InvokeRequest(item.id, event, invoked_arn(fn, item.version))
            # Committed before the handler can start, so a crash mid-run is always seen as a
            # started attempt (and counted) when the daemon recovers. Mostly written already,
            # while the attempts before it ran (_mark_ahead).
            if ahead is None:
                started_at = time.time()
                marked = self._store.mark_running(item.id, attempt, started_at, None)
            else:
                marked, started_at = ahead

            # The worker's pid goes into the row with the outcome; an attempt still running
            # after VISIBLE_AFTER_S gets it written now, to be seen while it runs. (A
            # daemon crash within that time leaves the crashed attempt without a pid.)
            pid_mark: list[asyncio.TimerHandle] = []

            def on_start(pid: int, started_at: float) -> None:
                pid_mark.append(
                    self._loop.call_later(
                        VISIBLE_AFTER_S,
                        self._store.mark_running,
                        item.id,
                        attempt,
                        started_at,
                        pid,
                    )
                )

            try:
                await asyncio.shield(marked)
            except StoreUnavailableError as exc:
                self._not_started(lane, item, exc)
                return
            except LookupError:  # another node owns it now (daemon/fleet.py): it runs it
                log.info("invocation_taken_over", invocation_id=item.id, function=fn.name)
                return
            self._mark_ahead(lane)
            try:
                # lane.fn: a reload while the row was being marked applies to this attempt too.
                target = self._version_of(lane.fn, item.version)
                try:
                    if isinstance(target, Outcome):  # its version or alias is gone
                        outcome = target
                    else:
                        outcome = await self._run(
                            target, request, attempt=attempt, on_start=on_start
                        )
                finally:
                    for timer in pid_mark:
                        timer.cancel()
            except asyncio.CancelledError:
                # The drain ran out of time: the attempt is recorded as interrupted and retried
                # by the policy after the next start, not left `running` for it to guess about.
                outcome = self._interrupted(started_at)
                log.warning(
                    "invocation_interrupted",
                    invocation_id=item.id,
                    function=fn.name,
                    attempt=attempt,
                    invocation_type="async",
                )
                await asyncio.shield(self._settle(lane, item, attempt, outcome))
                raise
            # The handler is done: its slot goes to the next invocation while this outcome
            # commits, so a lane runs handlers back to back instead of waiting on the disk.
            released = True
            lane.release()
            await self._settle_until_stored(lane, item, attempt, outcome)
        except asyncio.CancelledError:
            raise
        except LookupError:  # its row was taken over while it ran: the new owner ran it again
            log.warning(
                "invocation_outcome_refused",
                invocation_id=item.id,
                function=fn.name,
                reason="another node took this invocation over while it ran",
            )
        except Exception as exc:
            # The row stays queued or running; the next start recovers it. Say so loudly.
            log.error(
                "invocation_not_recorded", invocation_id=item.id, function=fn.name, error=str(exc)
            )
        finally:
            if not released:
                lane.release()
            self._in_flight.discard(item.id)

    def _mark_ahead(self, lane: Lane) -> None:
        """Write the `running` marks of the backlog's next items while this attempt runs.

        An attempt starts only once its mark is committed. Under load that commit queues behind
        the fsync of newly accepted events, and a slot waiting for it runs nothing: with quick
        handlers, most of a slot's time. Marks written ahead ride in the next group commit
        and are committed by the time a slot takes their items. The marks carry no worker
        (records.MARKED_AHEAD): a recovery after a crash records such an attempt crashed but
        never dead-letters on it the first time (settle.recover_running); a drain or a reload
        takes them back (_take_back_marks). Retries are never marked ahead: they are
        checked for their age when they start.
        """
        if lane.paused or lane.recent_ms > QUICK_MS or self.fenced():
            return
        limit = min(MARK_AHEAD, MARK_AHEAD_PER_SLOT * lane.fn.concurrency)
        room = limit - len(lane.marked_ahead)
        if room <= 0:
            return
        # The items marked so far are mostly the backlog's first ones: the search starts past
        # them (in C), instead of walking them again at every start.
        for item in itertools.islice(lane.backlog, len(lane.marked_ahead), limit + room):
            if item.id in lane.marked_ahead or item.attempt > item.retry_base:
                continue
            started_at = time.time()
            try:
                marked = self._store.mark_running(
                    item.id, item.attempt + 1, started_at, records.MARKED_AHEAD
                )
            except StoreUnavailableError:
                return
            lane.marked_ahead[item.id] = (marked, started_at, item.attempt + 1)
            room -= 1
            if room == 0:
                return

    def _take_back_marks(self, lanes: list[Lane]) -> asyncio.Task[Any] | None:
        """Queue again the items of paused `lanes` marked ahead: they never started."""
        items = []
        for lane in lanes:
            items += [(id, attempt) for id, (_, _, attempt) in lane.marked_ahead.items()]
            lane.marked_ahead.clear()
        if not items:
            return None
        log.info("invocation_marks_taken_back", count=len(items))
        return self._spawn(self._store.unmark_running(items))

    def _lease_in_doubt(
        self, lane: Lane, item: Backlogged, ahead: tuple[asyncio.Future[None], float] | None
    ) -> None:
        """Fenced: not started; back into the lane in a moment (its mark ahead, if any, taken
        back first, as it never started)."""
        if ahead is not None:
            self._spawn(self._store.unmark_running([(item.id, item.attempt + 1)]))
        lane.push_at(item, time.time() + FENCE_RETRY_S)

    def _not_started(self, lane: Lane, item: Backlogged, exc: StoreUnavailableError) -> None:
        """Never started: back into the lane once the store may take writes again."""
        delay = _STORE_BACKOFF.delay_s(item.attempt)
        log.error(
            "invocation_start_not_recorded",
            invocation_id=item.id,
            function=lane.fn.name,
            error=str(exc),
            retry_in_s=delay,
        )
        lane.push_at(item, time.time() + delay)

    async def _settle_until_stored(
        self, lane: Lane, item: Backlogged, attempt: int, outcome: Outcome
    ) -> None:
        """Record the attempt; while the store cannot take writes, keep the outcome and retry.

        The row stays `running` meanwhile, so a daemon stopped before the write lands still
        recovers the attempt on its next start. Other attempts cannot start meanwhile either:
        their `running` mark fails and sends them back to the lane.
        """
        for tries in itertools.count():
            try:
                await asyncio.shield(self._settle(lane, item, attempt, outcome))
                return
            except StoreUnavailableError as exc:
                delay = _STORE_BACKOFF.delay_s(tries)
                log.error(
                    "invocation_outcome_not_recorded",
                    invocation_id=item.id,
                    function=lane.fn.name,
                    status=outcome.status.value,
                    error=str(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)

    def _interrupted(self, started_at: float) -> Outcome:
        """A cancelled attempt's outcome: crashed, as the next start would record it otherwise."""
        message = INTERRUPTED_MESSAGE if self._stopping else "cancelled: its caller went away"
        now = time.time()
        payload = _json.encode(
            {"errorMessage": message, "errorType": INTERRUPTED_ERROR_TYPE, "stackTrace": []}
        )
        return Outcome(
            Status.CRASHED,
            payload,
            started_at,
            now,
            (now - started_at) * 1000,
            error_type=INTERRUPTED_ERROR_TYPE,
            error_message=message,
        )

    async def _settle(self, lane: Lane, item: Backlogged, attempt: int, outcome: Outcome) -> None:
        """Record an async attempt: final on success, else a scheduled retry or a dead letter."""
        fn = lane.fn
        # The store writes the final record and its destination in one transaction; a function
        # without destinations has nothing to route (and its final records share statements).
        route = self._router if fn.on_success or fn.on_failure else None
        if outcome.status is Status.SUCCEEDED:
            settled = await self._store.settle(item.id, attempt, outcome, route)
            lane.counts.finish(item.trigger, settled.status)
            self._resolve_final(item.id, settled.status)
            self._routed(settled.routed)
            return
        now = time.time()
        verdict = after_failure(
            fn, attempt=attempt, retry_base=item.retry_base, age_from=item.age_from, now=now
        )
        if verdict.next_attempt_at is None:
            settled = await self._store.settle(
                item.id, attempt, outcome, route, dead_letter=verdict.dead_letter
            )
            self._dead_lettered(lane, item, attempt, settled.status, verdict.dead_letter)
            self._routed(settled.routed)
            return
        await self._store.requeue(item.id, attempt, outcome, verdict.next_attempt_at)
        lane.counts.retries += 1
        at = verdict.next_attempt_at
        log.info(
            "invocation_retry_scheduled",
            invocation_id=item.id,
            function=fn.name,
            attempt=attempt,
            status=outcome.status.value,
            delay_s=round(at - now, 3),
            next_attempt_at=at,
        )
        lane.push_at(msgspec.structs.replace(item, attempt=attempt), at)

    def _dead_lettered(
        self, lane: Lane, item: Backlogged, attempt: int, status: str, reason: str | None
    ) -> None:
        log.warning(
            "invocation_dead_lettered",
            invocation_id=item.id,
            function=lane.fn.name,
            reason=reason,
            attempt=attempt,
            status=status,
        )
        lane.counts.finish(item.trigger, status)
        lane.counts.dead_letters += 1
        self._resolve_final(item.id, status)

    async def _run(
        self,
        fn: FunctionConfig,
        request: InvokeRequest,
        *,
        attempt: int,
        on_start: Callable[[int, float], None] | None = None,
    ) -> Outcome:
        invocation_id = request.invocation_id
        logs.invocation_started(log, invocation_id, fn.name, attempt)
        outcome = await self._pool.invoke(fn, request, on_start)
        if (lane := self._lanes.get(fn.name)) is not None:
            lane.counts.ran(outcome.duration_ms, outcome.init_duration_ms)
            lane.recent_ms += (outcome.duration_ms - lane.recent_ms) / 8  # for _mark_ahead
        if self.log_hub.followers:  # someone follows logs (daemon/tail.py)
            self.log_hub.publish(fn.name, invocation_id, fn.version, fn.memory_mb, attempt, outcome)
        logs.invocation_finished(
            log,
            invocation_id,
            fn.name,
            outcome.status.value,
            attempt,
            round(outcome.duration_ms, 3),
            outcome.error_type,
        )
        return outcome

    def _trigger_qualifier(self, fn: FunctionConfig, trigger_id: str | None) -> str | None:
        """The qualifier trigger `NAME#i` of `fn` invokes, if it names one."""
        if not trigger_id or not fn.triggers:
            return None
        _, _, index = trigger_id.rpartition("#")
        if not index.isdigit() or int(index) >= len(fn.triggers):
            return None
        qualifier: str | None = fn.triggers[int(index)].qualifier
        return qualifier

    def _version_of(self, fn: FunctionConfig, version: str) -> FunctionConfig | Outcome:
        """What an invocation bound to `version` runs now, or the failed Outcome that says
        the version or alias is gone (the attempt fails as a handler error would)."""
        if version == "$LATEST":
            return fn
        try:
            return self.versions.resolve(fn, version).fn
        except DeployError as exc:
            now = time.time()
            payload = _json.encode(
                {"errorMessage": exc.message, "errorType": exc.code, "stackTrace": []}
            )
            return Outcome(
                Status.FAILED,
                payload,
                now,
                now,
                0.0,
                error_type=exc.code,
                error_message=exc.message,
            )

    def _function_of(self, name: str) -> FunctionConfig | None:
        # Runs in the store's database thread too (Router): it only reads the lanes.
        lane = self._lanes.get(name)
        return lane.fn if lane is not None else None

    def _routed(self, r: Routed | None, *, enqueue: bool = True) -> None:
        """Log where a final outcome went; run a function destination; wake the outbox."""
        if r is None:
            return
        if r.kind == "stopped":
            log.warning(
                "invocation_chain_stopped",
                invocation_id=r.invocation_id,
                function=r.function,
                hops=r.hops,
                chain_root=r.chain_root,
                destination=r.destination,
                dead_letter_id=r.dead_letter_id,
            )
            return
        log.info(
            "destination_queued",
            invocation_id=r.invocation_id,
            function=r.function,
            condition=r.condition,
            destination=r.destination,
            outbox_id=r.outbox_id,
            child_id=r.child.id if r.child else None,
        )
        if r.child is not None and enqueue:
            self._enqueue(r.child)
        elif r.outbox_id is not None and self._on_outbox is not None:
            self._on_outbox()

    def _resolve_final(self, invocation_id: str, status: str) -> None:
        # Called only once nothing more will happen to it: success, or a dead letter.
        for future in self._final_waiters.pop(invocation_id, []):
            if not future.done():
                future.set_result(status)

    # --- shutdown -----------------------------------------------------------------------------

    def pause(self) -> None:
        """Start nothing new: the shutdown has begun. Sync callers still waiting are refused."""
        self._stopping = True
        self._lanes.pause(ShuttingDownError("the daemon is shutting down"))
        self._take_back_marks([*self._lanes.values(), *self._lanes.retired.values()])

    async def drain(self, timeout_s: float) -> int:
        """Pause; wait up to `timeout_s` for running invocations; cancel the rest.

        A cancelled one is recorded as an interrupted (crashed) attempt: an async invocation is
        retried by its policy after the next start, a sync one is final. Backlogged invocations
        stay queued in the store. Returns how many were cancelled.
        """
        self.pause()
        pending = {t for t in self._running if not t.done()}
        if pending:
            log.info("dispatcher_draining", in_flight=len(pending), timeout_s=timeout_s)
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        # Not twice: what an earlier drain cancelled (before a skip) is recording itself.
        cancelled = [task for task in pending if not task.cancelling()]
        for task in cancelled:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if cancelled:
            log.warning("dispatcher_drain_cancelled", cancelled=len(cancelled))
        if self._tasks:  # the records of what just finished, before the store closes
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.deferred.close()  # sync records still waiting: a last try
        with contextlib.suppress(StoreUnavailableError):  # and those written without a task
            await self._store.barrier()
        return len(cancelled)
