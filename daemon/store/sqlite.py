"""The invocation store: SQLite schema and migrations, the group-commit writer, and queries.

A write's awaitable resolves only after the COMMIT that holds it has returned (WAL with
``synchronous=FULL``), so a caller may acknowledge its source at that point and not before.

Bookkeeping of invocations already accepted (an attempt's start, its outcome, a retry) is
*relaxed*: a batch holding nothing else commits with ``synchronous=NORMAL``, without waiting
for fsync. Such a commit survives a kill -9 (it is in the OS's page cache); only a power cut can
undo it, and then the invocation simply runs again, as at-least-once allows. The next FULL
commit flushes every earlier frame of the WAL with it, since the WAL is written in order.

Bookkeeping that nobody waits on (an outcome, a retry) may also wait up to GROW_S for more
writes before its batch commits, so that fewer, larger transactions carry it; any other write
ends that wait as soon as it is queued (Store._next_batch). What runs in the
database thread (a batch's transaction, migrations) is daemon/store/batches.py.

After every commit the writer checks that the path still names the file it opened
(daemon/store/identity.py); once it does not, that batch and every later write fail with
StoreReplacedError, so nothing is acknowledged that a restart would not find.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from daemon.errors import StoreReplacedError, StoreUnavailableError
from daemon.metrics import COMMIT_BUCKETS_S, Histogram
from daemon.models import FINAL_STATUSES, Outcome
from daemon.store import (
    batched,
    cron,
    deploys,
    fleet,
    history,
    outbox,
    records,
    rejections,
    settle,
    stats,
    usage,
)
from daemon.store.batched import BatchItem
from daemon.store.batches import (
    BARRIER,
    BOOKKEEPING,
    BUSY_TIMEOUT_MS,
    DEFERRABLE,
    RELAXED,
    REPEATABLE,
    Batches,
    Write,
    prepare_writer,
    write,
)
from daemon.store.cron import CronFire
from daemon.store.fleet import TakenOver
from daemon.store.identity import FileIdentity
from daemon.store.migrations import MIGRATIONS
from daemon.store.outbox import OutboxRow
from daemon.store.records import NewInvocation, QueuedInvocation
from daemon.store.settle import (
    INTERRUPTED_ERROR_TYPE,
    INTERRUPTED_MESSAGE,
    Decide,
    Recovery,
    Route,
    Settled,
)

__all__ = [
    "INTERRUPTED_ERROR_TYPE",
    "BatchItem",
    "INTERRUPTED_MESSAGE",
    "MIGRATIONS",
    "NewInvocation",
    "QueuedInvocation",
    "Recovery",
    "Settled",
    "Store",
]

log = structlog.get_logger("lambdaemon.store")

T = TypeVar("T")

MAX_BATCH_OPS = 512
# A batch of deferrable ops alone waits this long for more writes, or until it holds
# GROW_OPS (see Store._next_batch).
GROW_S = 0.002
GROW_OPS = 32


class Store:
    """The one owner of the SQLite file: a group-commit writer plus a read-only connection.

    daemon/store/pgstore.py's PgStore is the same store on PostgreSQL.
    """

    backend = "sqlite"
    fleet = False  # one node: the file's

    def __init__(self, path: Path, node_id: str | None = None) -> None:
        self.path = Path(path)
        self.node_id = node_id or socket.gethostname()  # the node this store writes as
        self.commits = 0  # transactions committed by the writer; for metrics and tests
        self.write_failures = 0  # batches that could not be committed
        self.commit_seconds = Histogram(COMMIT_BUCKETS_S)  # each batch's hop, BEGIN to COMMIT
        self._queue: asyncio.Queue[tuple[Write, asyncio.Future[Any]] | None] = asyncio.Queue()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # the writer's, once opened (no getpid() per write)
        self._batches: Batches | None = None  # PgBatches on PostgreSQL
        self._growing: asyncio.Future[None] | None = None  # set while a batch waits to grow
        self._grow_until = 0  # queued writes that end the wait
        self._closing: asyncio.Future[None] | None = None
        self._identity: FileIdentity | None = None  # the files opened, once open
        self._replaced: str | None = None  # why the store takes no more writes, for good

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, node_id: str | None = None) -> AsyncIterator[Store]:
        """Create, migrate and start the store; on exit commit what is queued and close it."""
        store = cls(path, node_id)
        await store._start()
        try:
            yield store
        finally:
            await store.close()

    # --- writes ----------------------------------------------------------------------------

    async def insert(
        self, inv: NewInvocation, *, cron_fire: CronFire | None = None
    ) -> tuple[str, bool]:
        """Commit a new invocation; (existing_id, False) if its dedupe_key is already stored.

        `cron_fire` (trigger_id, nominal) marks that cron fire, only when the row is new: the
        row and its mark are committed together or not at all (daemon/store/cron.py).
        """
        inserted: tuple[str, bool]
        if cron_fire is None:
            inserted = await self._write(records.insert, REPEATABLE, inv=inv)
        else:
            inserted = await self._write(cron.insert_fire, REPEATABLE, inv=inv, fire=cron_fire)
        return inserted

    async def insert_rejected(
        self,
        inv: NewInvocation,
        error_type: str,
        error_message: str,
        result: bytes,
        *,
        cron_fire: CronFire | None = None,
    ) -> tuple[str, bool]:
        """Commit an input that could not become an event as a failed, dead-lettered invocation
        that never ran (daemon/store/rejections.py); deduplicated and durable like insert()."""
        inserted: tuple[str, bool] = await self._write(
            rejections.insert_rejected,
            REPEATABLE,
            inv=inv,
            error_type=error_type,
            error_message=error_message,
            result=result,
            fire=cron_fire,
        )
        return inserted

    def insert_nowait(self, inv: NewInvocation) -> asyncio.Future[tuple[str, bool]]:
        """Enqueue an insert now (writes commit in the order they are enqueued); await later."""
        future = self._submit(write(records.insert, BOOKKEEPING, inv=inv))
        future.add_done_callback(partial(_log_unawaited_failure, inv.id, "insert"))
        return future

    def mark_running(
        self, id: str, attempt: int, started_at: float, worker_pid: int | None
    ) -> asyncio.Future[None]:
        """Enqueue the start of an attempt; awaiting the returned future is optional."""
        # Not deferrable: the attempt's handler starts once this is committed.
        op = write(
            records.mark_running,
            RELAXED | REPEATABLE,
            id=id,
            attempt=attempt,
            started_at=started_at,
            worker_pid=worker_pid,
        )
        future = self._submit(op)
        future.add_done_callback(partial(_log_unawaited_failure, id, "mark_running"))
        return future

    async def unmark_running(self, items: list[tuple[str, int]]) -> None:
        """Take back the `running` marks of (id, attempt)s whose handler never started: their
        rows are queued again, without the attempt (Dispatcher's marks ahead)."""
        await self._write(records.unmark_running, RELAXED | REPEATABLE, items=items)

    def mark_batch_running(
        self, batch_id: str, items: list[tuple[str, int]], started_at: float
    ) -> asyncio.Future[None]:
        """Enqueue the start of a batch: its (id, attempt) items marked running in one write."""
        op = write(
            batched.mark_running,
            RELAXED | REPEATABLE,
            batch_id=batch_id,
            items=items,
            started_at=started_at,
        )
        future = self._submit(op)
        future.add_done_callback(partial(_log_unawaited_failure, batch_id, "mark_batch_running"))
        return future

    async def settle_batch(
        self, batch: NewInvocation, outcome: Outcome, items: list[BatchItem], route: Route | None
    ) -> list[Settled | None]:
        """Record a batch invocation (`batch`, finished with `outcome`) and what each item came
        to, in one transaction (daemon/store/batched.py); None for each item queued again."""
        _require_final(outcome)
        for item in items:
            _require_final(item.outcome)
        settled: list[Settled | None] = await self._write(
            batched.settle_batch,
            RELAXED | DEFERRABLE | REPEATABLE,
            batch=batch,
            outcome=outcome,
            items=items,
            now=time.time(),
            route=route,
        )
        return settled

    async def finish(
        self, id: str, attempt: int, outcome: Outcome, *, dead_letter: str | None = None
    ) -> None:
        """Record the final attempt: the invocation's final fields plus its attempts row.

        With `dead_letter` (a reason), the invocation is also marked dead-lettered. Routes no
        destination: for sync invocations, whose caller has the outcome (else see settle()).
        """
        await self._finish(id, attempt, outcome, dead_letter, None)

    async def settle(
        self,
        id: str,
        attempt: int,
        outcome: Outcome,
        route: Route | None,
        *,
        dead_letter: str | None = None,
    ) -> Settled:
        """finish() an async invocation and route its outcome's destination, in one transaction.

        `route` decides where the outcome goes (daemon/destinations/routing.py; None for a
        function without destinations); a new queued invocation or an outbox row is committed
        with the final record or not at all (daemon/store/settle.py). Returns where it went,
        for the caller to run or deliver.
        """
        return await self._finish(id, attempt, outcome, dead_letter, route)

    async def _finish(
        self,
        id: str,
        attempt: int,
        outcome: Outcome,
        dead_letter: str | None,
        route: Route | None,
    ) -> Settled:
        _require_final(outcome)
        settled: Settled = await self._write(
            settle.finish,
            RELAXED | DEFERRABLE | REPEATABLE,
            id=id,
            attempt=attempt,
            o=outcome,
            dead_letter=dead_letter,
            now=time.time(),
            route=route,
        )
        return settled

    async def record_finished(self, inv: NewInvocation, outcome: Outcome) -> None:
        """Insert a whole finished invocation (and its attempts row) in one statement pair.

        For short synchronous invocations that never needed a visible `running` row.
        """
        await self._wait(self.record_finished_nowait(inv, outcome))

    def record_finished_nowait(self, inv: NewInvocation, outcome: Outcome) -> asyncio.Future[None]:
        """record_finished(), enqueued now; the caller may await the future or only watch it."""
        _require_final(outcome)
        return self._submit(write(records.insert_finished, BOOKKEEPING, inv=inv, o=outcome))

    async def record_sync_final(self, inv: NewInvocation, outcome: Outcome) -> None:
        """A sync call's final record, written late: inserted whole, or its `running` row
        finished if that exists; repeating it adds nothing (daemon/store/settle.py)."""
        _require_final(outcome)
        await self._write(
            settle.record_sync_final, BOOKKEEPING, inv=inv, o=outcome, now=time.time()
        )

    async def requeue(
        self, id: str, attempt: int, outcome: Outcome, next_attempt_at: float
    ) -> None:
        """Record a failed attempt that will be retried; the row is queued again."""
        _require_final(outcome)
        await self._write(
            records.requeue,
            BOOKKEEPING,
            id=id,
            attempt=attempt,
            o=outcome,
            next_attempt_at=next_attempt_at,
        )

    async def dead_letter_waiting(
        self, id: str, reason: str, *, route: Route | None = None
    ) -> Settled:
        """Dead-letter a queued retry without running it; it keeps its last attempt's status.

        With `route`, its destination is routed in the same transaction, as by settle().
        """
        settled: Settled = await self._write(
            settle.dead_letter_waiting,
            REPEATABLE,
            id=id,
            reason=reason,
            now=time.time(),
            route=route,
        )
        return settled

    async def redrive(
        self, ids: list[str] | None, function: str | None, functions: list[str]
    ) -> list[QueuedInvocation]:
        """Queue dead letters of `functions` again (all, or `ids`, or one `function`'s)."""
        rows: list[QueuedInvocation] = await self._write(
            records.redrive,
            REPEATABLE,
            ids=ids,
            function=function,
            functions=functions,
            now=time.time(),
            node=self.node_id if self.fleet else None,
        )
        return rows

    async def mark_cron_fire(self, trigger_id: str, nominal: str) -> None:
        """Commit `trigger_id`'s last fire without an invocation (a trigger's first start)."""
        await self._write(cron.mark_fire, REPEATABLE, fire=(trigger_id, nominal))

    async def delete_delivered(self, outbox_id: int) -> None:
        """Remove an outbox record its target has acknowledged."""
        await self._write(outbox.delivered, REPEATABLE, id=outbox_id)

    async def record_delivery_failure(
        self, outbox_id: int, error: str, now: float, *, final: bool
    ) -> None:
        """Count a delivery attempt that failed; `final` keeps the record as failed for good."""
        await self._write(
            outbox.attempted, REPEATABLE, id=outbox_id, error=error, now=now, final=final
        )

    # --- deployed code, versions and aliases (daemon/versions.py keeps the rules) ------------

    async def load_deployments(self) -> deploys.DeployState:
        state: deploys.DeployState = await self._read(deploys.load)
        return state

    async def save_latest(self, latest: deploys.Latest, change: deploys.Change) -> None:
        await self._write(deploys.save_latest, REPEATABLE, latest=latest, change=change)

    async def save_version(self, version: deploys.Version, change: deploys.Change) -> None:
        await self._write(deploys.save_version, REPEATABLE, version=version, change=change)

    async def save_alias(self, alias: deploys.Alias, change: deploys.Change) -> None:
        await self._write(deploys.save_alias, REPEATABLE, alias=alias, change=change)

    async def delete_alias(self, function: str, name: str, change: deploys.Change) -> None:
        await self._write(
            deploys.delete_alias, REPEATABLE, function=function, name=name, change=change
        )

    async def delete_versions(
        self, function: str, numbers: list[int], change: deploys.Change
    ) -> None:
        await self._write(
            deploys.delete_versions, REPEATABLE, function=function, numbers=numbers, change=change
        )

    async def deploy_history(
        self, function: str, limit: int = 100, before: int | None = None
    ) -> list[deploys.Change]:
        """`function`'s deploy history, newest first; `before` pages by the entries' ids."""
        rows = await self.query(deploys.HISTORY, (function, before or 2**62, limit))
        return deploys.history_rows(rows)

    async def pending_versions(self, function: str) -> set[str]:
        """The versions that queued or running invocations of `function` are bound to."""
        rows = await self.query(deploys.QUEUED_VERSIONS, (function,))
        return {row[0] for row in rows}

    async def barrier(self) -> None:
        """Return once every write enqueued before this call is committed (or has failed)."""
        await self._wait(self._submit(BARRIER))

    async def transaction(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        repeatable: bool = False,
        relaxed: bool = False,
    ) -> T:
        """Run `fn` in the writer thread inside the next group commit.

        For the store's own modules (retention, health), tests and audits; the rest of the
        daemon calls named methods. `fn` runs in the database thread: it must be quick, must not
        touch the event loop, and must not BEGIN, COMMIT or ROLLBACK (an exception it raises
        rolls back what it wrote). `repeatable`: `fn` only runs SQL, so the writer may run it
        again after rolling its batch back (daemon/store/batches.py); otherwise its batch runs
        with one savepoint per op, where nothing runs twice. `relaxed`: it needs no fsync of its
        own, like the bookkeeping of accepted invocations (see the module doc).
        """
        flags = (REPEATABLE if repeatable else 0) | (RELAXED if relaxed else 0)
        result: T = await self._wait(self._submit(write(fn, flags)))
        return result

    async def recover(self, now: float, decide: Decide, route: Route | None = None) -> Recovery:
        """Settle the rows a dead daemon left 'running'; call once at start, before dispatching.

        Each interrupted attempt is recorded as crashed; `decide(function, attempt, retry_base,
        age_from)` (run in the database thread) says whether an async row is retried or
        dead-lettered. Sync rows end crashed: their caller owns retries. With `route`, each
        dead letter's destination is routed in the same transaction, as by settle().
        """
        recovery: Recovery = await self._write(
            settle.recover_running, 0, now=now, decide=decide, route=route
        )
        log.info(
            "store_recovered",
            requeued=len(recovery.requeued),
            crashed=len(recovery.crashed),
            dead_lettered=len(recovery.dead_lettered),
        )
        return recovery

    # --- the fleet (daemon/store/fleet.py; daemon/fleet.py runs it) -------------------------

    async def join(self, host: str, pid: int, lease_s: float) -> float:
        """Write this node's row, started now with a fresh lease (the database's now); before
        recover(), which it waits for a takeover of this node's work to finish for."""
        now: float = await self._write(
            fleet.join, 0, node_id=self.node_id, host=host, pid=pid, lease_s=lease_s
        )
        return now

    async def heartbeat(self, lease_s: float, load: dict[str, Any]) -> bool:
        """Renew this node's lease with its load; False when its row is gone (join again)."""
        renewed: bool = await self._write(
            fleet.heartbeat,
            RELAXED | REPEATABLE,
            node_id=self.node_id,
            lease_s=lease_s,
            load=load,
        )
        return renewed

    async def leave(self) -> None:
        """End this node's lease now (a clean stop): the others take its queued work over."""
        await self._write(fleet.leave, REPEATABLE, node_id=self.node_id)

    async def list_nodes(self) -> tuple[float, list[dict[str, Any]]]:
        """(the database's now, the nodes alive or recently gone) for GET /v1/nodes."""
        return await self._read(fleet.list_nodes)

    async def dead_nodes(self) -> list[str | None]:
        """Dead nodes that still own work (None: work no node owns), for take_over()."""
        return await self._read(partial(fleet.dead_nodes, node_id=self.node_id))

    async def release(self, ids: list[str]) -> list[str]:
        """Give up this node's queued rows `ids` for other nodes to take over; those released."""
        released: list[str] = await self._write(fleet.release, REPEATABLE, ids=ids)
        return released

    async def take_over(
        self, dead: str | None, free: dict[str, int], decide: Decide, route: Route | None
    ) -> TakenOver:
        """Claim up to `free[function]` of `dead`'s queued and running invocations per function
        (daemon/store/fleet.py take_over); what was claimed, to run."""
        taken: TakenOver = await self._write(
            fleet.take_over,
            0,
            node_id=self.node_id,
            dead=dead,
            free=free,
            now=time.time(),
            decide=decide,
            route=route,
        )
        return taken

    async def checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate both; True when a reader held on.

        On the writer's own connection, between two batches: a checkpoint from another
        connection has to win the write lock from a writer that takes it back after every
        batch, and under intake it lost for seconds (retention's shrinking waits on this).
        """
        writer = self._require(self._writer)
        if self._replaced is not None:
            raise StoreReplacedError(self._replaced)
        busy: bool = await writer._execute(_checkpoint, writer._conn)
        return busy

    @property
    def replaced(self) -> str | None:
        """Why the database file at `path` is no longer the one this store writes (None: it is).

        Set once, for good: see daemon/store/identity.py.
        """
        return self._replaced

    def check_file(self) -> str | None:
        """Look whether the path still names the opened files now (two stat() calls); `replaced`.

        The writer looks after every commit; the health check calls this once a second, so an
        idle store notices too.
        """
        if self._replaced is None and self._identity is not None:
            changed = self._identity.changed()
            if changed is not None:
                self._mark_replaced(changed)
        return self._replaced

    def _mark_replaced(self, changed: str) -> None:
        if self._replaced is None:
            self._replaced = (
                f"the database file was replaced or deleted ({changed}); nothing more is"
                " stored or acknowledged: restart lambdaemon"
            )
            log.error("store_file_replaced", path=str(self.path), error=changed)

    @property
    def queued(self) -> int:
        """Writes waiting for the writer to take them; for metrics and tests."""
        return self._queue.qsize()

    @property
    def reruns(self) -> int:
        """Batches rolled back because an op failed, then run again op by op; for tests."""
        return self._batches.reruns if self._batches is not None else 0

    # --- reads -------------------------------------------------------------------------------

    async def load_queued(
        self, limit: int = 1000, after: tuple[float, str] | None = None
    ) -> list[QueuedInvocation]:
        """Queued rows in (queued_at, id) order; pass the last row's pair as `after` to page."""
        sql = f"SELECT {records.QUEUED_COLUMNS} FROM invocations WHERE status = 'queued'"
        sql += records.OWNED  # a fleet's node: its own (daemon/store/dialect.py)
        params: tuple[Any, ...] = ()
        if after is not None:
            sql += " AND (queued_at, id) > (?, ?)"
            params = after
        rows = await self.query(sql + " ORDER BY queued_at, id LIMIT ?", (*params, limit))
        return [QueuedInvocation(**dict(row)) for row in rows]

    async def get(self, id: str) -> dict[str, Any] | None:
        """The full record (event and result as bytes, logs) with its "attempts" list."""
        return await self._read(partial(records.fetch_record, id=id))

    async def list_invocations(
        self, function: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Newest first, without event, result and logs."""
        return await self.history(history.HistoryQuery(function=function, status=status), limit)

    async def history(self, query: history.HistoryQuery, limit: int) -> list[dict[str, Any]]:
        """One page of summaries matching `query`, newest first (daemon/store/history.py)."""
        sql, params = history.page_sql(query, limit)
        return [dict(row) for row in await self.query(sql, params)]

    async def usage(self, since_day: int, by: str) -> list[dict[str, Any]]:
        """Usage sums from UTC day `since_day` on, `by` "day" (newest first) or "function"."""
        rows = await self.query(usage.BY_DAY if by == "day" else usage.BY_FUNCTION, (since_day,))
        return [dict(row) for row in rows]

    async def log_records(
        self,
        function: str | None,
        since: float,
        status: str | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Records queued since `since`, oldest first, with what `daemon/tail.py` prints of their
        last attempt; pass the last row's (queued_at, id) as `after` to page."""
        sql = f"SELECT {records.LOG_COLUMNS} FROM invocations WHERE queued_at >= ?"
        params: list[Any] = [since]
        # Without a function, `+status` keeps SQLite on the queued_at index (in time order)
        # instead of a status index and a sort of every match.
        by_status = "status = ?" if function is not None else "+status = ?"
        for clause, value in (("function = ?", function), (by_status, status)):
            if value is not None:
                sql += f" AND {clause}"
                params.append(value)
        if after is not None:
            sql += " AND (queued_at, id) > (?, ?)"
            params += after
        rows = await self.query(sql + " ORDER BY queued_at, id LIMIT ?", (*params, limit))
        return [dict(row) for row in rows]

    async def save_memory_sizes(self, memory_mb: dict[str, int]) -> None:
        """Each function's configured memory_mb, which usage multiplies billed time by."""
        await self._write(usage.save_memory, REPEATABLE, memory_mb=memory_mb)

    async def list_dead_letters(
        self, function: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Dead-lettered invocations, most recently dead-lettered first, as summaries."""
        sql = f"SELECT {records.SUMMARY_COLUMNS} FROM invocations"
        sql += " WHERE dead_letter_reason IS NOT NULL"
        params: tuple[Any, ...] = ()
        if function is not None:
            sql += " AND function = ?"
            params = (function,)
        rows = await self.query(
            sql + " ORDER BY dead_lettered_at DESC, id DESC LIMIT ?", (*params, limit)
        )
        return [dict(row) for row in rows]

    async def window_stats(
        self, functions: list[str], start: float, end: float, buckets: int
    ) -> dict[str, Any]:
        """Per function figures of a time window, in `buckets` buckets (daemon/store/stats.py)."""
        return await self._read(
            partial(stats.window_stats, functions=functions, start=start, end=end, buckets=buckets)
        )

    async def count_outbox(self) -> dict[str, int]:
        """Outbox records by status (pending, failed)."""
        return {status: count for status, count in await self.query(outbox.COUNTS)}

    async def load_due_outbox(self, blocked: list[str], limit: int) -> list[OutboxRow]:
        """Pending outbox records, oldest first, but for those of the `blocked` channels."""
        rows = await self.query(outbox.DUE, (json.dumps(blocked), limit))
        return [OutboxRow(**dict(row)) for row in rows]

    async def event_of(self, id: str) -> bytes | None:
        """The invocation's event (None for an unknown id)."""
        rows = await self.query("SELECT event FROM invocations WHERE id = ?", (id,))
        return bytes(rows[0][0]) if rows else None

    async def events_of(self, ids: list[str]) -> dict[str, bytes]:
        """The events of the invocations `ids` that exist, by id."""
        rows = await self.query(
            "SELECT id, event FROM invocations WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids),),
        )
        return {row[0]: bytes(row[1]) for row in rows}

    async def error_of(self, id: str) -> dict[str, str | None] | None:
        """The invocation's `error_type` and `error_message` (None for an unknown id)."""
        rows = await self.query(records.ERROR_OF, (id,))
        return dict(rows[0]) if rows else None

    async def dedupe_keys_in(self, low: str, high: str) -> list[str]:
        """The stored dedupe keys from `low` (included) to `high` (excluded), in key order."""
        return [row[0] for row in await self.query(records.DEDUPE_KEYS_IN, (low, high))]

    async def last_dedupe_key_in(self, low: str, high: str) -> str | None:
        """The greatest stored dedupe key from `low` (included) to `high` (excluded)."""
        rows = await self.query(records.LAST_DEDUPE_KEY_IN, (low, high))
        return rows[0][0] if rows else None

    async def last_cron_fire(self, trigger_id: str) -> str | None:
        """The nominal time of `trigger_id`'s last committed fire, as mark_cron_fire wrote it."""
        rows = await self.query(cron.LAST_FIRE, (trigger_id,))
        return rows[0][0] if rows else None

    async def status_of(self, id: str) -> str | None:
        rows = await self.query("SELECT status FROM invocations WHERE id = ?", (id,))
        return rows[0]["status"] if rows else None

    async def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        """Run a read on the read-only connection; it sees every write committed before.

        For the store's own modules, tests and audits: the rest of the daemon calls named methods.
        """
        reader = self._require(self._reader)
        return list(await reader.execute_fetchall(sql, params))

    # --- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit every write already enqueued, then close both connections; idempotent."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shut_down())
        # Shielded: a cancelled caller must not abandon queued writes or leave the DB threads
        # (non-daemon since aiosqlite 0.22) keeping the process alive.
        await asyncio.shield(self._closing)

    async def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await aiosqlite.connect(self.path, isolation_level=None)
            version = await self._writer._execute(prepare_writer, self._writer._conn, self.path)
            self._batches = Batches(self._writer._conn, synchronous="FULL")  # as prepared
            # Read-only, so a trigger's query() can never write behind the writer's back.
            uri = self.path.resolve().as_uri() + "?mode=ro"
            self._reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            self._reader.row_factory = sqlite3.Row
            await self._reader.execute_fetchall(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._identity = FileIdentity(self.path)  # the WAL exists now: prepared above
        except BaseException:
            await self._close_connections()
            raise
        self._loop = loop = asyncio.get_running_loop()
        self._writer_task = loop.create_task(self._write_loop(), name="store-writer")
        log.info("store_opened", path=str(self.path), schema_version=version)

    async def _shut_down(self) -> None:
        try:
            if self._writer_task is not None:
                self._queue.put_nowait(None)  # the writer stops after committing what precedes
                if self._growing is not None:
                    _wake(self._growing)
                await self._writer_task
        finally:
            await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
                # close() returns as the thread hands back its last result; joining (a few
                # microseconds) makes "closed" mean no thread is left behind.
                conn._thread.join(timeout=1)

    # --- the writer ----------------------------------------------------------------------------

    async def _write(self, fn: Callable[..., Any], flags: int, /, **kwargs: Any) -> Any:
        return await self._wait(self._submit(write(fn, flags, **kwargs)))

    def _submit(self, op: Write) -> asyncio.Future[Any]:
        if self._writer_task is None or self._closing is not None or self._writer_task.done():
            raise StoreUnavailableError(f"store {self.path} is closed")
        future = self._loop.create_future()
        self._queue.put_nowait((op, future))
        if self._growing is not None and (
            not op.flags & DEFERRABLE or self._queue.qsize() >= self._grow_until
        ):
            _wake(self._growing)  # someone waits on this one, or the batch is big enough
        return future

    async def _wait(self, future: asyncio.Future[T]) -> T:
        # A cancelled caller cancels this future, which is its alone, and nothing else: its
        # write stays queued and is committed regardless (the writer skips a future already
        # done). Not through asyncio.shield(), whose outer future and two callbacks cost each
        # accepted event more than the rest of this wait.
        return await future

    async def _write_loop(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                ops = [item for item in batch if item is not None]
                if ops:
                    await self._commit(ops)
                if len(ops) < len(batch):
                    return
        finally:
            # Only reached with work left if the writer was cancelled: nobody waits forever.
            left = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            _fail_all([item for item in left if item is not None], "the store is closed", None)

    async def _next_batch(self) -> list[tuple[Write, asyncio.Future[Any]] | None]:
        """What is queued (up to MAX_BATCH_OPS), once there is something.

        Every batch costs the database thread about as much as tens of bookkeeping writes
        (BEGIN, COMMIT and its WAL write, the hop into the thread and back, two thread
        wake-ups), and under load the writer finds only one or two writes queued each time: a
        warm call finishes every few hundred microseconds. So a batch of deferrable writes alone
        waits up to GROW_S for more, or until it holds GROW_OPS. Any other write ends the wait
        as it is queued: nobody waiting on a write waits longer for it.
        """
        batch = [await self._queue.get()]
        self._take(batch)
        if len(batch) < GROW_OPS and all(
            item is not None and item[0].flags & DEFERRABLE for item in batch
        ):
            loop = self._loop
            self._growing = growing = loop.create_future()
            self._grow_until = GROW_OPS - len(batch)
            timer = loop.call_later(GROW_S, _wake, growing)
            try:
                await growing
            except asyncio.CancelledError:
                _fail_all(
                    [item for item in batch if item is not None],
                    "the store writer was cancelled",
                    None,
                )
                raise
            finally:
                timer.cancel()
                self._growing = None
            self._take(batch)
        return batch

    def _take(self, batch: list[tuple[Write, asyncio.Future[Any]] | None]) -> None:
        while len(batch) < MAX_BATCH_OPS and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _commit(self, ops: list[tuple[Write, asyncio.Future[Any]]]) -> None:
        writer, batches, identity = self._writer, self._batches, self._identity
        # The writer task starts only once the connection is open and prepared.
        assert writer is not None and batches is not None
        if self._replaced is not None:  # said once already (store_file_replaced)
            self.write_failures += 1
            _fail_all(ops, self._replaced, None, StoreReplacedError)
            return
        try:
            # The whole transaction in ONE hop into aiosqlite's thread (a private API): every
            # public call is its own thread round trip (~100 us), far more than SQLite's work.
            clock = time.perf_counter()
            results = await writer._execute(batches.run, [fn for fn, _ in ops])
            self.commit_seconds.observe(time.perf_counter() - clock)
        except asyncio.CancelledError:
            _fail_all(ops, "the store writer was cancelled", None)
            raise
        except Exception as exc:
            self.write_failures += 1
            log.error("store_write_failed", reason=str(exc), ops=len(ops))
            _fail_all(ops, str(exc), exc)
            return
        self.commits += 1
        # After the COMMIT, before anyone hears "stored": a file deleted while the batch ran is
        # seen in time. Here in the loop (two stat() calls, a few microseconds), not in the
        # database thread, where each call would hand the GIL to the loop and wait to get it back.
        if identity is not None and (changed := identity.changed()) is not None:
            self.write_failures += 1
            self._mark_replaced(changed)
            _fail_all(ops, self._replaced or changed, None, StoreReplacedError)
            return
        for (_, future), (ok, value) in zip(ops, results, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def _read(self, fn: Callable[..., T]) -> T:
        reader = self._require(self._reader)
        result: T = await reader._execute(fn, reader._conn)  # one hop for a consistent snapshot
        return result

    def _require(self, conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if conn is None or self._closing is not None:
            raise StoreUnavailableError(f"store {self.path} is closed")
        return conn


def _checkpoint(conn: sqlite3.Connection) -> bool:
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return bool(busy)


def _fail_all(
    ops: list[tuple[Write, asyncio.Future[Any]]],
    reason: str,
    cause: Any,
    kind: type[StoreUnavailableError] = StoreUnavailableError,
) -> None:
    # COMMIT may fail after the data reached the disk (an fsync error), so "failed" can still
    # mean "stored": callers do not acknowledge, the source redelivers, the dedupe key catches it.
    for _, future in ops:
        if not future.done():
            error = kind(f"store write failed: {reason}")
            error.__cause__ = cause
            future.set_exception(error)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _log_unawaited_failure(id: str, op: str, future: asyncio.Future[None]) -> None:
    # Nobody has to await these writes, so a failure is reported here (and marked retrieved).
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.warning("store_write_failed", reason=str(exc), invocation_id=id, op=op)


def _require_final(outcome: Outcome) -> None:
    if outcome.status not in FINAL_STATUSES:
        raise ValueError(f"an attempt must end in a final status, not {outcome.status!r}")
