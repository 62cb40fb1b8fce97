"""Retention: the store stays within `retention_days` and `max_db_mb`, so a small disk never fills.

Every round deletes final invocations (with their attempts, logs and dead-letter state) in small
batches, each one savepoint in the store's group commit, so intake waits at most one batch (about
BATCH_TARGET_S) behind a prune. What is never deleted:
- `queued` and `running` rows: work not done yet (a retry waiting for its time is `queued`);
- rows that ended less than KEEP_FINISHED_S ago: the files trigger reads the final status of its
  invocation before it moves the file, and wait_final() callers look the row up;
- other tables: `cron_fires` is one row per trigger and is what keeps a cron fire from repeating
  (invocation rows are not), so old cron invocations may go; `outbox` rows still pending
  delivery (a destination record whose target refused it for good goes by age).
By age, a row goes once both its acceptance and its end are older than `retention_days`. By size,
the oldest rows go first, dead letters only after every other final row, until the live data is
LOW of the budget again.

Space. Deleted rows leave free pages inside the file, which new rows reuse: the file stops
growing. It shrinks only when it is over its budget (after max_db_mb was lowered, or before the
first prune): `PRAGMA incremental_vacuum` in batches, then a checkpoint truncates the file. That
needs auto_vacuum = INCREMENTAL, which SQLite fixes when the first table is created; a database
made without it is converted by one VACUUM at start while it is small (CONVERT_MAX_MB). The WAL
gets its own slice of the budget (journal_size_limit and wal_autocheckpoint on the writer).

Log events: store_pruned (rows, bytes, ...), store_over_limit, store_prune_failed,
store_auto_vacuum_enabled, store_auto_vacuum_off, store_limit_above_disk.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from daemon.config import DaemonSettings
from daemon.errors import StoreUnavailableError
from daemon.models import FINAL_STATUSES
from daemon.store.sqlite import Store

log = structlog.get_logger("lambdaemon.retention")

MIB = 1024 * 1024
AGE_EVERY_S = 3600.0  # age pruning: hourly is plenty for a limit counted in days
SIZE_EVERY_S = 10.0  # the size check is two stat() calls, so it runs often
KEEP_FINISHED_S = 60.0
HIGH, LOW = 0.9, 0.8  # size pruning starts above HIGH of the file's budget and stops at LOW
BATCH_ROWS = (16, 128, 4096)  # rows per transaction: least, first, most
BATCH_TARGET_S = 0.02  # each batch holds the writer about this long; the size adapts to it
VACUUM_PAGES = 256  # pages given back per transaction when the file shrinks
CONVERT_MAX_MB = 16  # a bigger database is not converted at start: its VACUUM would take long
CHECKPOINT_BUSY_MS = 2000
INCREMENTAL = 2  # PRAGMA auto_vacuum

_LIVE_PAGES = "SELECT * FROM pragma_page_count(), pragma_freelist_count()"
_FINAL = "status IN ({})".format(", ".join(f"'{s.value}'" for s in sorted(FINAL_STATUSES)))
# (table, where, order): each batch deletes the first rows of one of these.
_BY_AGE = (
    "invocations",
    f"{_FINAL} AND queued_at < :cutoff"
    " AND COALESCE(ended_at, dead_lettered_at, queued_at) < :cutoff",
    "queued_at",
)
_BY_SIZE = (
    "invocations",
    f"{_FINAL} AND dead_letter_reason IS NULL AND COALESCE(ended_at, queued_at) < :keep",
    "queued_at",
)
_DEAD_BY_SIZE = (
    "invocations",
    f"{_FINAL} AND dead_letter_reason IS NOT NULL"
    " AND COALESCE(dead_lettered_at, ended_at, queued_at) < :keep",
    "dead_lettered_at",
)
# Destination records their target refused for good; pending ones are never touched.
_OUTBOX_BY_AGE = (
    "outbox",
    "status = 'failed' AND COALESCE(last_attempt_at, created_at) < :cutoff",
    "id",
)


class Pruner:
    """Deletes old final records by age and by size, and gives space back when over budget."""

    def __init__(self, store: Store, settings: DaemonSettings) -> None:
        self._store = store
        self._path = store.path
        self._retention_s = settings.retention_days * 86_400
        limit = settings.max_db_mb * MIB
        self._wal_bytes = min(4 * MIB, max(256 * 1024, limit // 8))
        self._db_bytes = limit - self._wal_bytes  # the database file's share of max_db_mb
        self._max_db_mb = settings.max_db_mb
        self._batch = BATCH_ROWS[1]
        self._incremental = False
        self._page_size = 4096
        self._over = False  # over the budget with nothing left to prune
        self._outbox = False

    async def prepare(self) -> None:
        """Once at start, before intake: incremental auto-vacuum and the WAL's size limits."""
        mode, self._page_size = await asyncio.to_thread(_vacuum_mode, self._path)
        if mode != INCREMENTAL:
            mode = await self._convert()
        self._incremental = mode == INCREMENTAL
        tables = await self._store.query("SELECT 1 FROM sqlite_master WHERE name = 'outbox'")
        self._outbox = bool(tables)  # schema v3 (destinations)
        pages = max(16, self._wal_bytes // self._page_size)
        await self._store.transaction(partial(_limit_wal, pages=pages, size=self._wal_bytes))
        disk = os.statvfs(self._path.parent)
        room = disk.f_bavail * disk.f_frsize + self.disk_bytes()
        if room < self._max_db_mb * MIB:
            log.warning(
                "store_limit_above_disk",
                max_db_mb=self._max_db_mb,
                room_mb=round(room / MIB, 1),
                data_dir=str(self._path.parent),
            )

    async def run(self) -> None:
        """Prune at once, then by size whenever needed and by age every AGE_EVERY_S."""
        age_due = 0.0
        while True:
            now = time.time()
            by_age = now >= age_due
            if self._store.replaced is not None:  # for good: /health says so, nothing to do
                await asyncio.sleep(SIZE_EVERY_S)
                continue
            try:
                if by_age or self.disk_bytes() > HIGH * self._db_bytes:
                    await self.prune(now, by_age=by_age)
                if by_age:
                    age_due = now + AGE_EVERY_S
            except StoreUnavailableError as exc:  # the health check reports it loudly
                log.warning("store_prune_failed", error=str(exc))
            except Exception as exc:  # a bug here must not stop intake: log it, try again later
                log.error("store_prune_failed", error=repr(exc), exc_info=True)
            await asyncio.sleep(SIZE_EVERY_S)

    async def prune(self, now: float, *, by_age: bool = True) -> dict[str, Any]:
        """One round; returns what store_pruned logs (also when nothing was deleted)."""
        started, disk_before = time.perf_counter(), self.disk_bytes()
        live_before = live = await self._live_bytes()
        aged = sized = outbox = 0
        if by_age and self._retention_s > 0:
            cutoff = {"cutoff": min(now - self._retention_s, now - KEEP_FINISHED_S)}
            aged, live = await self._delete(_BY_AGE, cutoff, 0)
            if self._outbox:
                outbox, live = await self._delete(_OUTBOX_BY_AGE, cutoff, 0)
        if live > HIGH * self._db_bytes:
            keep = {"keep": now - KEEP_FINISHED_S}
            target = int(LOW * self._db_bytes)
            sized, live = await self._delete(_BY_SIZE, keep, target)
            if live > target:
                dead, live = await self._delete(_DEAD_BY_SIZE, keep, target)
                sized += dead
            self._report_over_limit(live)
        if await self._file_bytes() > self._db_bytes:
            await self._shrink()
        report = {
            "rows": aged + sized,
            "by_age": aged,
            "by_size": sized,
            "outbox": outbox,
            "bytes": max(0, live_before - live),
            "released_bytes": disk_before - self.disk_bytes(),
            "db_mb": round(self.disk_bytes() / MIB, 2),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if report["rows"] or outbox or report["released_bytes"] > 0:
            log.info("store_pruned", **report)
        return report

    def _report_over_limit(self, live: int) -> None:
        over = live > HIGH * self._db_bytes
        if over and not self._over:  # once per episode, not every SIZE_EVERY_S
            log.warning(
                "store_over_limit",
                live_mb=round(live / MIB, 2),
                max_db_mb=self._max_db_mb,
                reason="the rest is queued, running or ended in the last minute",
            )
        elif self._over and not over:
            log.info("store_within_limit", live_mb=round(live / MIB, 2), max_db_mb=self._max_db_mb)
        self._over = over

    def disk_bytes(self) -> int:
        """What the store takes on disk: the database file and its WAL."""
        return sum(_size(Path(f"{self._path}{suffix}")) for suffix in ("", "-wal"))

    # --- deleting ------------------------------------------------------------------------------

    async def _delete(
        self, rule: tuple[str, str, str], params: dict[str, float], target: int
    ) -> tuple[int, int]:
        """Delete batches by `rule` until none is left or the live data is under `target`.

        Returns (rows deleted, live bytes after).
        """
        table, where, order = rule
        deleted, live = 0, await self._live_bytes()
        while live > target:
            op = partial(
                _delete_batch,
                table=table,
                where=where,
                order=order,
                params=params,
                limit=self._batch,
            )
            rows, live_pages, held_s = await self._store.transaction(op)
            live = live_pages * self._page_size
            deleted += rows
            self._adapt(held_s)
            if rows == 0:
                break
        return deleted, live

    def _adapt(self, held_s: float) -> None:
        # Halve a batch that held the writer too long, double one that was quick: the board's
        # storage decides, not a guess made on a development machine.
        least, _, most = BATCH_ROWS
        if held_s > BATCH_TARGET_S:
            self._batch = max(least, self._batch // 2)
        elif held_s < BATCH_TARGET_S / 2:
            self._batch = min(most, self._batch * 2)

    async def _live_bytes(self) -> int:
        rows = await self._store.query(_LIVE_PAGES)
        return int((rows[0][0] - rows[0][1]) * self._page_size)

    async def _file_bytes(self) -> int:
        # The file as the latest commit sees it: the file on disk shrinks at the next checkpoint.
        rows = await self._store.query("SELECT * FROM pragma_page_count()")
        return int(rows[0][0] * self._page_size)

    # --- giving space back ---------------------------------------------------------------------

    async def _shrink(self) -> None:
        """Give free pages back until the file is within HIGH of its budget, then checkpoint."""
        if not self._incremental:
            return  # store_auto_vacuum_off said so at start; the free pages are reused instead
        excess = (await self._file_bytes() - int(HIGH * self._db_bytes)) // self._page_size
        released = 0
        while excess > released:
            pages = min(excess - released, VACUUM_PAGES)
            freed = await self._store.transaction(partial(_vacuum, pages=pages))
            if freed == 0:
                break  # no free pages left: the rest is live data
            released += freed
        if not released:
            return
        busy = await asyncio.to_thread(_checkpoint, self._path)
        if busy:  # a reader held on: the next round (or the writer's own checkpoint) finishes
            log.info("store_checkpoint_busy", path=str(self._path))

    async def _convert(self) -> int:
        db_bytes = _size(self._path)
        disk = os.statvfs(self._path.parent)
        # VACUUM writes a copy of the database (through the WAL) before it replaces it.
        if db_bytes > CONVERT_MAX_MB * MIB or disk.f_bavail * disk.f_frsize < 3 * db_bytes:
            log.warning(
                "store_auto_vacuum_off",
                db_mb=round(db_bytes / MIB, 1),
                effect="free pages are reused but the file never shrinks",
                fix=f"stop the daemon, then: sqlite3 {self._path}"
                " 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM;'",
            )
            return 0
        started = time.perf_counter()
        try:
            mode = await asyncio.to_thread(_enable_incremental_vacuum, self._path)
        except sqlite3.Error as exc:  # busy, or no room after all: the next start tries again
            log.warning("store_auto_vacuum_off", db_mb=round(db_bytes / MIB, 1), error=str(exc))
            return 0
        log.info(
            "store_auto_vacuum_enabled",
            db_mb=round(db_bytes / MIB, 2),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return mode


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- run in the store's database thread (inside the writer's transaction) ---------------------


def _delete_batch(
    conn: sqlite3.Connection,
    table: str,
    where: str,
    order: str,
    params: dict[str, float],
    limit: int,
) -> tuple[int, int, float]:
    started = time.perf_counter()
    # Attempts go with their invocation (ON DELETE CASCADE; the writer has foreign_keys on).
    rows = conn.execute(
        f"DELETE FROM {table} WHERE id IN"
        f" (SELECT id FROM {table} WHERE {where} ORDER BY {order} LIMIT :limit)",
        {**params, "limit": limit},
    ).rowcount
    pages, free = conn.execute(_LIVE_PAGES).fetchone()
    return rows, pages - free, time.perf_counter() - started


def _vacuum(conn: sqlite3.Connection, pages: int) -> int:
    before = conn.execute("PRAGMA freelist_count").fetchone()[0]
    # Python's sqlite3 steps a statement without result columns once, and each step of
    # incremental_vacuum gives back one page: so one execute per page (a cached statement).
    for _ in range(min(pages, before)):
        conn.execute("PRAGMA incremental_vacuum")
    return int(before - conn.execute("PRAGMA freelist_count").fetchone()[0])


def _limit_wal(conn: sqlite3.Connection, pages: int, size: int) -> None:
    # Connection settings of the writer: it checkpoints after `pages` frames, and cuts the WAL
    # back to `size` whenever it starts over, so the WAL stays within its share of max_db_mb.
    conn.execute(f"PRAGMA wal_autocheckpoint = {int(pages)}")
    conn.execute(f"PRAGMA journal_size_limit = {int(size)}")


# --- run in a worker thread, on a short-lived connection of our own ---------------------------
# VACUUM and checkpoints cannot run inside a transaction, and the writer is always inside one
# when it runs our code; the store's other connection is read-only.


def _vacuum_mode(path: Path) -> tuple[int, int]:
    # A fresh connection: one that has cached the header may not see another one's VACUUM.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row: tuple[int, int] = conn.execute(
            "SELECT * FROM pragma_auto_vacuum(), pragma_page_size()"
        ).fetchone()
        return row
    finally:
        conn.close()


def _enable_incremental_vacuum(path: Path) -> int:
    conn = sqlite3.connect(path, isolation_level=None, timeout=CHECKPOINT_BUSY_MS / 1000)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")  # rebuilds the file; only then does the new mode apply
        return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    finally:
        conn.close()


def _checkpoint(path: Path) -> bool:
    """Copy the WAL into the file and truncate both; True when readers or the writer held on."""
    # mode=rw: never create a database at the path (it may have been deleted meanwhile).
    uri = f"{path.resolve().as_uri()}?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=CHECKPOINT_BUSY_MS / 1000)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return bool(busy)
    except sqlite3.OperationalError:  # SQLITE_BUSY past the timeout: try again next round
        return True
    finally:
        conn.close()
