"""Retention: the store stays within `retention_days` and `max_db_mb`, so a small disk never fills.

Every round deletes final invocations (with their attempts, logs and dead-letter state) in
batches, each one op in the store's group commit, so intake waits at most one batch (about
BATCH_TARGET_S) behind a prune. What is never deleted:
- `queued` and `running` rows: work not done yet (a retry waiting for its time is `queued`);
- by age, rows that ended less than KEEP_FINISHED_S ago; by size, async rows that ended less
  than SIZE_KEEP_ASYNC_S ago: the files trigger reads the final status of its invocation (and
  its error) right after it ends, and wait_final() callers look the row up. A sync row is read
  by nobody once its caller has the answer, so under size pressure it may go at once: a grace
  of a minute would let a minute of sync intake (3,000 calls/s on a small machine) pile up;
- other tables: `cron_fires` is one row per trigger and is what keeps a cron fire from repeating
  (invocation rows are not), so old cron invocations may go; `outbox` rows still pending
  delivery (a destination record whose target refused it for good goes by age).
By age, a row goes once both its acceptance and its end are older than `retention_days`. By size,
every other final row goes, oldest first, before the first dead letter does; then dead letters,
least recently dead-lettered first; until the live data is LOW of the budget again.

Keeping up with intake. The size check is one query on the read-only connection, so it runs
often: every CHECK_S, and sooner while the live data grows towards HIGH (it comes when about half
of the room left would be used at the rate just measured, MIN_CHECK_S at the least). Rows are
found in rowid order, which is the order they were written in (the table's own b-tree: no index
to keep, and a range scan from the last batch's end, so rows that must stay are stepped over
once per round, not once per batch), and deleted a range at a time. A prune batch is relaxed,
like bookkeeping (daemon/store/sqlite.py): a delete that a power cut undoes is simply done again,
so it never waits for an fsync of its own. Its size is what frees a fraction of the WAL's slice
(the WAL takes about a quarter of what a range delete frees), made smaller only when a batch held
the writer far longer than BATCH_TARGET_S (Pruner._adapt).

Space. Deleted rows leave free pages inside the file, which new rows reuse: the file stops
growing. It shrinks only when it is over its budget (after max_db_mb was lowered, before the
first prune, after a burst) and intake is quiet: `PRAGMA incremental_vacuum` in batches, then a
checkpoint truncates the file. That needs auto_vacuum = INCREMENTAL, which SQLite fixes when the
first table is created: a new file gets it then (daemon/store/batches.py); a database made
without it is converted by one VACUUM at start while it is small (CONVERT_MAX_MB). The WAL
gets its own slice of the budget (journal_size_limit and wal_autocheckpoint on the writer).

The margin. The database file gets max_db_mb less the WAL's slice, and pruning starts at HIGH
of that, or lower while intake is fast (Pruner._high), so what intake adds before pruning
catches up fits below it. The WAL is checkpointed at half its slice, but can run past it for a
moment while a checkpoint cannot restart it: the file plus its WAL stays within max_db_mb plus
MARGIN_MB (tests/store/test_retention.py and benchmarks/retention.py measure it), and within
max_db_mb again once intake is quiet (_shrink, _trim_wal).

On PostgreSQL (daemon/store/pgstore.py) only the age rules apply (AgePruner): the server's
disk is its administrator's, and pages, the WAL and VACUUM are the server's own business.

Log events: store_pruned (rows, bytes, released_bytes, rounds...: at most one line every
LOG_EVERY_S, summing the rounds since the last one), store_over_limit, store_within_limit,
store_prune_failed, store_auto_vacuum_enabled, store_auto_vacuum_off, store_limit_above_disk.
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
CHECK_S = 1.0  # the size check, at the latest; one query of the live page count
MIN_CHECK_S = 0.05  # ... and at the soonest, while intake is fast and the room small
KEEP_FINISHED_S = 60.0  # by age: rows that ended less than this ago stay
SIZE_KEEP_ASYNC_S = 2.0  # by size: async rows that ended less than this ago stay
HIGH, LOW = 0.85, 0.7  # size pruning starts above HIGH of the file's budget and stops at LOW
LAG_S = 1.0  # ... or earlier, so that this long of intake still fits (Pruner._high)
FLOOR = 0.3  # ... but never below FLOOR of the budget: that much history stays
BATCH_ROWS = (64, 16384)  # rows per transaction: least (and first), most
BATCH_TARGET_S = 0.02  # a batch that held the writer much longer than this is made smaller
MAX_BATCH_BYTES = 2 * MIB  # live data deleted per transaction, at most (see Pruner._adapt)
# The file plus its WAL stays within max_db_mb plus this (docs/reliability.md says so): the database
# file stays within its share, but the WAL can run past its slice for a moment while a
# checkpoint cannot restart it (a reader is still on an older snapshot).
MARGIN_MB = 1
QUIET_S = 5.0  # the file is shrunk and the WAL cut back only after this long without busy intake
LOG_EVERY_S = 10.0  # store_pruned: at most one line this often, with the sums since the last
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
# Scanned in rowid order from the last batch's end (_delete_range), so no `order`.
_BY_SIZE = (
    f"{_FINAL} AND dead_letter_reason IS NULL"
    " AND (invocation_type = 'sync' OR COALESCE(ended_at, queued_at) < :keep)"
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
        self._batch = BATCH_ROWS[0]  # grows to _batch_bytes once a batch showed the rows' size
        self._time_cap = BATCH_ROWS[1]  # rows per batch that the storage's speed allows
        # Live data deleted per transaction: deleting a range writes about a quarter of what it
        # frees to the WAL (index and interior pages, the freelist), so this keeps one prune
        # batch within a fraction of the WAL's slice of max_db_mb.
        self._batch_bytes = min(MAX_BATCH_BYTES, self._wal_bytes)
        self._incremental = False
        self._page_size = 4096
        self._over = False  # over the budget with nothing left to prune
        self._outbox = False
        self._last_live: tuple[float, int] | None = None  # (monotonic, bytes) at the last check
        self._trimmed_at = -CHECK_S  # monotonic: the WAL's last checkpoint of ours
        self._busy_until = 0.0  # monotonic: intake counts as busy until then (_quiet)
        self._rate = 0.0  # bytes/s the live data grows by (_growth)
        self._unlogged: dict[str, float] = {}  # rounds since the last store_pruned line
        self._logged_at = -LOG_EVERY_S  # monotonic; the first round with rows logs at once

    async def prepare(self) -> None:
        """Once at start, before intake: incremental auto-vacuum and the WAL's size limits."""
        mode, self._page_size = await asyncio.to_thread(_vacuum_mode, self._path)
        if mode != INCREMENTAL:
            mode = await self._convert()
        self._incremental = mode == INCREMENTAL
        tables = await self._store.query("SELECT 1 FROM sqlite_master WHERE name = 'outbox'")
        self._outbox = bool(tables)  # schema v3 (destinations)
        pages = max(16, self._wal_bytes // 2 // self._page_size)  # see _limit_wal
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
                await asyncio.sleep(CHECK_S)
                continue
            wait_s = CHECK_S
            try:
                live = await self._live_bytes()
                rate = self._growth(live)
                quiet = self._quiet(rate)
                if by_age or live > self._high():
                    await self.prune(now, by_age=by_age, shrink=quiet)
                    live = await self._live_bytes()
                if by_age:
                    age_due = now + AGE_EVERY_S
                self._last_live = (time.monotonic(), live)
                wait_s = self._next_check_s(rate, live)
                if quiet:  # what a burst left: a file over its budget, a long WAL
                    if (await self._file_pages()) * self._page_size > self._db_bytes:
                        await self._shrink()
                    await self._trim_wal()
                self._flush_log()  # the last rounds of a burst, once LOG_EVERY_S has passed
            except StoreUnavailableError as exc:  # the health check reports it loudly
                log.warning("store_prune_failed", error=str(exc))
            except Exception as exc:  # a bug here must not stop intake: log it, try again later
                log.error("store_prune_failed", error=repr(exc), exc_info=True)
            await asyncio.sleep(wait_s)

    def _growth(self, live: int) -> float:
        """Bytes per second the live data grows by: since the last check (after its pruning),
        or half the rate the check before reported, whichever is more. A single short interval
        says little (intake commits in groups), and one check that saw no growth must not send
        the next check a whole CHECK_S away while intake runs at megabytes a second."""
        last, at = self._last_live, time.monotonic()
        rate = 0.0
        if last is not None and live > last[1] and at > last[0]:
            rate = (live - last[1]) / (at - last[0])
        self._rate = max(rate, self._rate / 2)
        return self._rate

    def _high(self) -> float:
        """Where size pruning starts: HIGH of the budget, or lower while intake is fast.

        Under load the pruner can lag intake by a round or so (its batches queue behind
        intake's, and its task behind the requests on the loop): whatever intake adds
        meanwhile lands on top of the live data and makes the file's high-water mark. So room
        for LAG_S of intake at the current rate is kept below the budget. At 3 MB/s into a
        5 MB store that leaves about 1.4 MB of history: a small budget under heavy load keeps
        little, but it stays a budget.
        """
        return max(FLOOR * self._db_bytes, HIGH * self._db_bytes - self._rate * LAG_S)

    def _quiet(self, rate: float) -> bool:
        """Whether intake has been slow for QUIET_S: busy is when it would fill the band between
        HIGH and LOW within CHECK_S. One slow check (right after a round) is not enough."""
        at = time.monotonic()
        if rate * CHECK_S >= (HIGH - LOW) * self._db_bytes:
            self._busy_until = at + QUIET_S
        return at >= self._busy_until

    def _next_check_s(self, rate: float, live: int) -> float:
        """When about half the room left below HIGH would be used at `rate`."""
        if rate <= 0:
            return CHECK_S
        room = max(0.0, self._high() - live)
        return min(CHECK_S, max(MIN_CHECK_S, room / rate / 2))

    async def _trim_wal(self) -> None:
        """Cut a WAL over its slice of max_db_mb back to nothing, at most once a CHECK_S.

        SQLite cuts it back to journal_size_limit only when a write starts it over, so the WAL
        a burst left behind would stay as large as it grew once intake stops. Only while
        intake is quiet (the caller's part): the checkpoint holds the writer while it runs.
        """
        at = time.monotonic()
        if at - self._trimmed_at < CHECK_S or _size(Path(f"{self._path}-wal")) <= self._wal_bytes:
            return
        self._trimmed_at = at
        await self._store.checkpoint()

    async def prune(
        self, now: float, *, by_age: bool = True, shrink: bool = True
    ) -> dict[str, Any]:
        """One round; returns its report (also when nothing was deleted); store_pruned logs
        the sums of the rounds at most every LOG_EVERY_S.

        `shrink`: give free pages back if the file is over its budget. Not while intake is
        busy: it reuses the freed pages at once, so shrinking would only make it grow the file
        again, and each page given back is one statement (and under load one wait for the
        GIL, up to 5 ms), which held whole rounds up for seconds while intake went on.
        """
        started = time.perf_counter()
        pages_before = await self._file_pages()
        live_before = live = await self._live_bytes()
        aged = sized = outbox = 0
        if by_age and self._retention_s > 0:
            cutoff = {"cutoff": min(now - self._retention_s, now - KEEP_FINISHED_S)}
            aged, live = await self._delete(_BY_AGE, cutoff, 0)
            if self._outbox:
                outbox, live = await self._delete(_OUTBOX_BY_AGE, cutoff, 0)
        if live > (high := self._high()):
            target = int(high * LOW / HIGH)
            sized, live = await self._delete_range(_BY_SIZE, now - SIZE_KEEP_ASYNC_S, target)
            if live > target:  # every other final row that may go is gone: dead letters now
                keep = {"keep": now - SIZE_KEEP_ASYNC_S}
                dead, live = await self._delete(_DEAD_BY_SIZE, keep, target)
                sized += dead
            self._report_over_limit(live)
        if shrink and (await self._file_pages()) * self._page_size > self._db_bytes:
            await self._shrink()
        # What the round gave back to the filesystem, from the file's page counts: intake that
        # committed meanwhile may have added pages (it reuses the freed ones first, and may
        # need more), so the difference can be negative: that is intake's growth, not a
        # release, and it counts as 0. The file on disk shrinks at the next checkpoint.
        released = max(0, pages_before - await self._file_pages()) * self._page_size
        report = {
            "rows": aged + sized,
            "by_age": aged,
            "by_size": sized,
            "outbox": outbox,
            "bytes": max(0, live_before - live),
            "released_bytes": released,
            "db_mb": round(self.disk_bytes() / MIB, 2),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        self._log_round(report)
        return report

    def _log_round(self, report: dict[str, Any]) -> None:
        # Under sustained intake a round runs every fraction of a second: one line per round
        # would be a way to fill the disk the pruning is there to keep free.
        if not (report["rows"] or report["outbox"] or report["released_bytes"]):
            return
        sums = self._unlogged
        for key in ("rows", "by_age", "by_size", "outbox", "bytes", "released_bytes"):
            sums[key] = sums.get(key, 0) + report[key]
        sums["rounds"] = sums.get("rounds", 0) + 1
        sums["duration_ms"] = round(sums.get("duration_ms", 0) + report["duration_ms"], 1)
        sums["max_round_ms"] = max(sums.get("max_round_ms", 0), report["duration_ms"])
        self._flush_log()

    def _flush_log(self) -> None:
        at = time.monotonic()
        if self._unlogged and at - self._logged_at >= LOG_EVERY_S:
            log.info("store_pruned", **self._unlogged, db_mb=round(self.disk_bytes() / MIB, 2))
            self._unlogged, self._logged_at = {}, at

    def _report_over_limit(self, live: int) -> None:
        over = live > HIGH * self._db_bytes
        if over and not self._over:  # once per episode, not every check
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

    async def _delete_range(self, where: str, keep: float, target: int) -> tuple[int, int]:
        """Delete rows matching `where`, lowest rowids first, until none is left or the live data
        is under `target`. Returns (rows deleted, live bytes after)."""
        deleted, live, after = 0, await self._live_bytes(), 0
        while live > target:
            op = partial(_delete_rows, where=where, keep=keep, after=after, limit=self._batch)
            rows, after, freed, live_pages, held_s = await self._store.transaction(
                op, repeatable=True, relaxed=True
            )
            self._adapt(rows, freed * self._page_size, held_s)
            live = live_pages * self._page_size
            deleted += rows
            if rows == 0:
                break
        return deleted, live

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
            rows, live_pages, held_s = await self._store.transaction(
                op, repeatable=True, relaxed=True
            )
            self._adapt(rows, live - live_pages * self._page_size, held_s)
            live = live_pages * self._page_size
            deleted += rows
            if rows == 0:
                break
        return deleted, live

    def _adapt(self, rows: int, freed: int, held_s: float) -> None:
        """The next batch's rows: what frees about `_batch_bytes`, as far as the storage allows.

        The rows' size comes from the batch just done (pages it freed, counted inside its
        transaction, so intake in the same commit does not blur it), and a batch at most
        doubles the one before: one odd batch cannot make the next a huge one. Its time only
        caps the batch when it was far over BATCH_TARGET_S: under load the database thread
        waits for the GIL after every statement (up to the 5 ms switch interval), so a batch's
        wall time says more about the event loop than about the disk, and halving on every
        slow batch shrank batches to a few rows each: pruning then fell far behind intake.
        """
        least, most = BATCH_ROWS
        if held_s > 4 * BATCH_TARGET_S:
            self._time_cap = max(least, rows // 2)
        elif held_s < BATCH_TARGET_S:
            self._time_cap = min(most, self._time_cap * 2)
        if rows > 0 and freed > 0:
            want = int(self._batch_bytes * rows / freed)
            self._batch = max(least, min(most, self._time_cap, want, 2 * self._batch))

    async def _live_bytes(self) -> int:
        rows = await self._store.query(_LIVE_PAGES)
        return int((rows[0][0] - rows[0][1]) * self._page_size)

    async def _file_pages(self) -> int:
        # The file as the latest commit sees it: the file on disk shrinks at the next checkpoint.
        rows = await self._store.query("SELECT * FROM pragma_page_count()")
        return int(rows[0][0])

    # --- giving space back ---------------------------------------------------------------------

    async def _shrink(self) -> None:
        """Give free pages back until the file is within HIGH of its budget, then checkpoint."""
        if not self._incremental:
            return  # store_auto_vacuum_off said so at start; the free pages are reused instead
        excess = await self._file_pages() - int(HIGH * self._db_bytes) // self._page_size
        released = 0
        while excess > released:
            pages = min(excess - released, VACUUM_PAGES)
            freed = await self._store.transaction(
                partial(_vacuum, pages=pages), repeatable=True, relaxed=True
            )
            if freed == 0:
                break  # no free pages left: the rest is live data
            released += freed
        if not released:
            return
        busy = await self._store.checkpoint()
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


class AgePruner:
    """Retention by age alone, for a store that is not a file (PostgreSQL, daemon/store/pgstore.py).

    The same rules as Pruner's by age (_BY_AGE, _OUTBOX_BY_AGE, KEEP_FINISHED_S), in batches of
    AGE_BATCH_ROWS rows, each one relaxed op in the store's group commit, every AGE_EVERY_S.
    max_db_mb does not apply: the server's disk is its administrator's (docs/store.md).
    """

    def __init__(self, store: Store, settings: DaemonSettings) -> None:
        self._store = store
        self._retention_s = settings.retention_days * 86_400

    async def prepare(self) -> None:
        """Nothing to set up (Pruner's prepare() shapes an SQLite file)."""

    async def run(self) -> None:
        while True:
            try:
                await self.prune(time.time())
            except StoreUnavailableError as exc:  # the health check reports it loudly
                log.warning("store_prune_failed", error=str(exc))
            except Exception as exc:  # a bug here must not stop intake: log it, try again later
                log.error("store_prune_failed", error=repr(exc), exc_info=True)
            await asyncio.sleep(AGE_EVERY_S)

    async def prune(self, now: float) -> dict[str, Any]:
        """One round: every final record past retention_days, and failed outbox records."""
        started = time.perf_counter()
        counts = {"by_age": 0, "outbox": 0}
        if self._retention_s > 0:
            cutoff = {"cutoff": min(now - self._retention_s, now - KEEP_FINISHED_S)}
            for key, rule in (("by_age", _BY_AGE), ("outbox", _OUTBOX_BY_AGE)):
                while True:
                    table, where, order = rule
                    op = partial(
                        _delete_aged,
                        table=table,
                        where=where,
                        order=order,
                        params=cutoff,
                        limit=AGE_BATCH_ROWS,
                    )
                    rows = await self._store.transaction(op, repeatable=True, relaxed=True)
                    counts[key] += rows
                    if rows < AGE_BATCH_ROWS:
                        break
        report = {
            "rows": counts["by_age"],
            **counts,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if report["rows"] or report["outbox"]:
            log.info("store_pruned", **report)
        return report


AGE_BATCH_ROWS = 1000


def pruner_for(store: Store, settings: DaemonSettings) -> Pruner | AgePruner:
    """The store's retention: by age and size for an SQLite file, by age on PostgreSQL."""
    return Pruner(store, settings) if store.backend == "sqlite" else AgePruner(store, settings)


def _delete_aged(
    conn: sqlite3.Connection,
    table: str,
    where: str,
    order: str,
    params: dict[str, float],
    limit: int,
) -> int:
    # Attempts go with their invocation (ON DELETE CASCADE in pg_schema.py).
    return int(
        conn.execute(
            f"DELETE FROM {table} WHERE id IN"
            f" (SELECT id FROM {table} WHERE {where} ORDER BY {order} LIMIT :limit)",
            {**params, "limit": limit},
        ).rowcount
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- run in the store's database thread (inside the writer's transaction) ---------------------


def _delete_rows(
    conn: sqlite3.Connection, where: str, keep: float, after: int, limit: int
) -> tuple[int, int, int, int, float]:
    """Up to `limit` rows matching `where` past rowid `after`, as one rowid range.

    Returns (rows deleted, the range's last rowid: the next batch starts after it, pages that
    freed, live pages after, seconds it took). NOT INDEXED: the table's own b-tree in rowid
    order, oldest first, whatever index the planner would otherwise pick for `status IN (...)`.
    """
    started = time.perf_counter()
    pages, free = conn.execute(_LIVE_PAGES).fetchone()
    live_before = pages - free
    params = {"keep": keep, "after": after, "limit": limit}
    last = conn.execute(
        "SELECT max(rowid) FROM (SELECT rowid FROM invocations NOT INDEXED"
        f" WHERE rowid > :after AND {where} ORDER BY rowid LIMIT :limit)",
        params,
    ).fetchone()[0]
    rows = 0
    if last is not None:
        # Attempts go with their invocation (ON DELETE CASCADE; the writer has foreign_keys on).
        rows = conn.execute(
            "DELETE FROM invocations NOT INDEXED"
            f" WHERE rowid > :after AND rowid <= :last AND {where}",
            {**params, "last": last},
        ).rowcount
    pages, free = conn.execute(_LIVE_PAGES).fetchone()
    live = pages - free
    return rows, last or after, live_before - live, live, time.perf_counter() - started


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
    # Connection settings of the writer: it checkpoints after `pages` frames (half its share:
    # the commit that crosses the mark, and those while the checkpoint runs, still fit), and
    # cuts the WAL back to `size` whenever it starts over, so it stays within its share.
    conn.execute(f"PRAGMA wal_autocheckpoint = {int(pages)}")
    conn.execute(f"PRAGMA journal_size_limit = {int(size)}")


# --- run in a worker thread, on a short-lived connection of our own ---------------------------
# VACUUM cannot run inside a transaction, and the writer is always inside one
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
