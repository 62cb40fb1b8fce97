"""Store health: whether the store can take writes right now, for /health, the logs and systemd.

Intake already refuses what it cannot store (a failed commit raises StoreUnavailableError and the
source does not acknowledge); this module makes that state visible and says why. It watches the
store's write-failure counter and the filesystem (read-only flag, free space) every CHECK_S; on a
failure it runs a probe, a one-row write through the group commit, whose error names the reason
(disk_full, read_only, io_error, locked, stalled, unavailable). While degraded it probes again as
soon as any write commits (a source's retry got through), and otherwise after PROBE_S, doubling
up to MAX_PROBE_S: /health turns healthy again without waiting for traffic, and a long outage
does not add a failed write to the log every few seconds.

On PostgreSQL (daemon/store/pgstore.py) the same watch, without the files: a server that
cannot be reached (stopped, restarted, the network down) is `unreachable`, and the store comes
back by itself once a probe commits (each connection is opened again before its next use);
the server's own refusals keep their meaning (`disk_full`, `read_only`), any other `unavailable`.

One reason is final: `replaced`, when the path no longer names the database file the store
opened (deleted, or another file moved there; daemon/store/identity.py). Each check looks (two
stat() calls) before anything else; from then on the store refuses every write and /health
answers 503 until the daemon is restarted, which opens whatever file is at the path then.

Log events: store_degraded (error; repeated every REPEAT_S while it lasts), store_restored,
disk_space_low, disk_space_ok.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from daemon.backoff import Backoff
from daemon.deferred import DeferredRecords
from daemon.store.sqlite import Store
from daemon.systemd import notify

log = structlog.get_logger("lambdaemon.health")

CHECK_S = 1.0
PROBE_S = 2.0
MAX_PROBE_S = 30.0
PROBE_TIMEOUT_S = 10.0  # a write that has not committed by then counts as a failure (stalled)
REPEAT_S = 60.0
LOW_DISK_BYTES = 16 * 1024 * 1024  # below this much free space a warning comes first
MIB = 1024 * 1024
_PROBE_BACKOFF = Backoff(PROBE_S, MAX_PROBE_S)  # by failed probes in a row

_REASONS = {
    sqlite3.SQLITE_FULL: "disk_full",
    sqlite3.SQLITE_READONLY: "read_only",
    sqlite3.SQLITE_IOERR: "io_error",
    sqlite3.SQLITE_BUSY: "locked",
    sqlite3.SQLITE_LOCKED: "locked",
    sqlite3.SQLITE_CANTOPEN: "read_only",
}


class StoreHealth:
    """Watches whether the store can commit; `report()` is what GET /health answers."""

    def __init__(self, store: Store, deferred: DeferredRecords | None = None) -> None:
        self._store = store
        self._deferred = deferred  # sync records waiting for the store, shown in report()
        self._dir = store.path.parent
        self._file = store.backend == "sqlite"  # else no file, no disk of ours to watch
        self._seen_failures = store.write_failures
        self._seen_commits = store.commits
        self._failed_probes = 0
        self._probe_at = 0.0  # while degraded: when the next probe is due
        self.reason: str | None = None  # None: healthy
        self.error = ""
        self._since = 0.0
        self._logged_at = 0.0
        self._low_disk = False

    @property
    def degraded(self) -> bool:
        return self.reason is not None

    async def run(self) -> None:
        """Check every CHECK_S until cancelled; while degraded, probe as the module doc says."""
        while True:
            committed = self._store.commits != self._seen_commits
            if not self.degraded or committed or time.monotonic() >= self._probe_at:
                await self.check()
            await asyncio.sleep(CHECK_S)

    async def check(self) -> None:
        """One look; probes when a write failed since the last look, or while degraded."""
        if self._replaced():
            return  # no probe: no write can succeed again
        disk = _statvfs(self._dir) if self._file else None
        self._watch_free_space(disk)
        failures = self._store.write_failures
        read_only = disk is not None and bool(disk.f_flag & os.ST_RDONLY)
        if failures == self._seen_failures and not self.degraded and not read_only:
            return
        self._seen_failures = failures
        reason, error = await self._probe()
        self._seen_commits = self._store.commits
        self._failed_probes = self._failed_probes + 1 if reason else 0
        self._probe_at = time.monotonic() + _PROBE_BACKOFF.delay_s(self._failed_probes)
        if reason is None and read_only:  # the probe may have fit in what SQLite had cached
            reason, error = "read_only", f"the filesystem holding {self._dir} is mounted read-only"
        self._set(reason, error)

    def report(self) -> dict[str, Any]:
        """`status` ok or degraded (with `reason`, `error`, `since`), and the store's figures."""
        self._replaced()  # at once, not at the next check: the writer may have seen it already
        store: dict[str, Any]
        if not self._file:
            store = {
                "backend": self._store.backend,
                "url": getattr(self._store, "where", ""),
                "write_failures": self._store.write_failures,
            }
        else:
            disk = _statvfs(self._dir)
            store = {
                "path": str(self._store.path),
                "db_mb": round(_size(self._store.path) / MIB, 3),
                "wal_mb": round(_size(Path(f"{self._store.path}-wal")) / MIB, 3),
                "disk_free_mb": round(disk.f_bavail * disk.f_frsize / MIB, 3) if disk else None,
                "write_failures": self._store.write_failures,
            }
        if self._deferred is not None:
            store.update(self._deferred.report())
        if self.reason is None:
            return {"status": "ok", "store": store}
        return {
            "status": "degraded",
            "reason": self.reason,
            "error": self.error,
            "since": self._since,
            "store": store,
        }

    def _replaced(self) -> bool:
        replaced = self._store.check_file()
        if replaced is not None and self.reason != "replaced":
            self._set("replaced", replaced)
        return replaced is not None

    async def _probe(self) -> tuple[str | None, str]:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._store.transaction(_probe_write)
        except TimeoutError:
            return "stalled", f"a write has not committed within {PROBE_TIMEOUT_S:g} s"
        except Exception as exc:  # StoreUnavailableError, or the probe's own sqlite3 error
            return _reason(exc), str(exc)
        return None, ""

    def _set(self, reason: str | None, error: str) -> None:
        now = time.time()
        if reason is None:
            if self.reason is not None:
                after_s = round(now - self._since, 1)
                log.warning("store_restored", reason=self.reason, after_s=after_s)
                notify("STATUS=serving")
            self.reason, self.error = None, ""
            return
        if reason != self.reason or now - self._logged_at >= REPEAT_S:
            if reason != self.reason:
                self._since = now
            self._logged_at = now
            # Loud on purpose: events are refused (webhooks 503, MQTT unacked, files and cron
            # retried) until someone frees space or fixes the disk.
            where = {"data_dir": str(self._dir)} if self._file else {"url": self._where()}
            log.error(
                "store_degraded",
                reason=reason,
                error=error,
                **where,
                for_s=round(now - self._since, 1),
                **self._disk_figures(),
            )
            notify(f"STATUS=degraded: store {reason}: {error}")
        self.reason, self.error = reason, error

    def _watch_free_space(self, disk: os.statvfs_result | None) -> None:
        if disk is None:
            return
        low = disk.f_bavail * disk.f_frsize < LOW_DISK_BYTES
        if low != self._low_disk:
            (log.warning if low else log.info)(
                "disk_space_low" if low else "disk_space_ok",
                data_dir=str(self._dir),
                **self._disk_figures(),
            )
        self._low_disk = low

    def _where(self) -> str:
        return str(getattr(self._store, "where", ""))

    def _disk_figures(self) -> dict[str, float]:
        disk = _statvfs(self._dir) if self._file else None
        if disk is None:
            return {}
        return {
            "disk_free_mb": round(disk.f_bavail * disk.f_frsize / MIB, 3),
            "disk_size_mb": round(disk.f_blocks * disk.f_frsize / MIB, 1),
        }


STORE_HEALTH: web.AppKey[StoreHealth] = web.AppKey("store_health", StoreHealth)


def _probe_write(conn: sqlite3.Connection) -> None:
    # One small row rewritten in place: a real page write through the WAL, like an event's,
    # without growing anything (the table comes from the migrations).
    conn.execute(
        "INSERT INTO store_probe VALUES (1, ?)"
        " ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
        (time.time(),),
    )


def _reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # StoreUnavailableError carries the database's error as its cause
        code = getattr(cause, "sqlite_errorcode", None)
        if code is not None:
            return _REASONS.get(code & 0xFF, "unavailable")
        if type(cause).__module__.startswith("psycopg"):
            return _pg_reason(cause)
        cause = cause.__cause__
    return "unavailable"


# PostgreSQL's SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_REASONS = {"53100": "disk_full", "25006": "read_only", "57P01": "unreachable"}
_PG_UNREACHABLE_CLASSES = ("08", "57")  # connection exceptions; operator intervention


def _pg_reason(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    if state is None:  # libpq's own failure: no server answered, or the connection was lost
        return "unreachable"
    if state in _PG_REASONS:
        return _PG_REASONS[state]
    return "unreachable" if state[:2] in _PG_UNREACHABLE_CLASSES else "unavailable"


def _statvfs(path: Path) -> os.statvfs_result | None:
    try:
        return os.statvfs(path)
    except OSError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
