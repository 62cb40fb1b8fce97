"""What the store's writer runs in the database thread: one batch of writes as one transaction.

A write (Write) is a call on the connection with flags saying what the writer may do with it.
Batches runs a batch so that each write fails alone, in as few statements as it can; the
asyncio side (queueing, group commit, who waits for what) is daemon/store/sqlite.py.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from daemon.errors import StoreUnavailableError
from daemon.store import records, settle
from daemon.store.migrations import MIGRATIONS

Op = Callable[[sqlite3.Connection], Any]

BUSY_TIMEOUT_MS = 5000

# What the writer may do with a write (its flags):
RELAXED = 1  # needs no fsync of its own (see daemon/store/sqlite.py's docstring)
# May run again after its transaction was rolled back (see Batches): the write only runs SQL,
# or any Python it runs only decides and returns (a Route, daemon/store/settle.py). A write
# without it puts its whole batch on the slower path, one savepoint per op, where nothing runs
# twice.
REPEATABLE = 2
DEFERRABLE = 4  # relaxed, and nobody waits on its commit to go on: its batch may wait to grow
BOOKKEEPING = RELAXED | REPEATABLE | DEFERRABLE
# These say the database cannot take writes right now, not that one operation is wrong. SQLite
# may already have rolled the whole transaction back, so they fail the whole batch.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so busy_timeout applies and no later statement
    # can fail with BUSY_SNAPSHOT.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def prepare_writer(conn: sqlite3.Connection, path: Path) -> int:
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        # A new file: incremental auto-vacuum, which SQLite fixes when the first table is made,
        # so that retention can give pages back (daemon/store/retention.py); a file made
        # without it is converted by the pruner at start, while it is small.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StoreUnavailableError(f"{path}: cannot use WAL journaling (got {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    # Statement journals (a multi-row INSERT needs one) stay in memory: past 64 KiB SQLite
    # would spill one into a temporary file, created, written and deleted for that statement.
    conn.execute("PRAGMA temp_store = MEMORY")
    return _migrate(conn, path)


def _migrate(conn: sqlite3.Connection, path: Path) -> int:
    for version, statements in enumerate(MIGRATIONS, start=1):
        with _immediate(conn):
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise StoreUnavailableError(
                    f"{path}: schema version {current} is newer than this lambdaemon knows"
                    f" ({len(MIGRATIONS)}); upgrade lambdaemon or use another data_dir"
                )
            if current >= version:
                continue
            for sql in statements:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {version}")
    return len(MIGRATIONS)


class Write(partial):  # type: ignore[type-arg]
    """A write in the queue; `flags` say how the writer may treat it (RELAXED, REPEATABLE...)."""

    flags: int


def write(fn: Callable[..., Any], flags: int, /, **kwargs: Any) -> Write:
    op = Write(fn, **kwargs)
    op.flags = flags
    return op


class Batches:
    """Runs the writer's batches, in the database thread (never two at once).

    Each op fails alone: an op that raises is rolled back and the rest of its batch commits.
    A savepoint around every op would do that at the cost of two statements (and GIL
    hand-offs) per op, for a failure that almost never comes. So a batch of repeatable ops
    runs without them first; if one of its ops raises, the transaction is rolled back and the
    batch runs again with a savepoint per op, where only that op fails. An "unavailable" error
    (disk full, I/O error, busy...) fails the whole batch either way. Run bare, consecutive
    inserts of queued invocations and of finished sync calls also share their statements
    (records.insert_many, insert_finished_many): every statement hands the GIL to the event
    loop and back, and under load that costs the loop more than SQLite's own work.

    It also remembers the connection's `synchronous` level and sets it only when a batch needs
    the other one. Nothing else changes it after prepare_writer: SQLite refuses to change it
    inside a transaction, so an op cannot.
    """

    def __init__(self, conn: sqlite3.Connection, synchronous: str) -> None:
        self._conn = conn
        self._synchronous = synchronous
        self.reruns = 0  # optimistic batches rolled back and run again op by op

    def run(self, ops: list[Write]) -> list[tuple[bool, Any]]:
        conn = self._conn
        level = "NORMAL" if all(op.flags & RELAXED for op in ops) else "FULL"
        if level != self._synchronous:
            conn.execute(f"PRAGMA synchronous = {level}")
            self._synchronous = level
        if all(op.flags & REPEATABLE for op in ops):
            # Optimistic: no savepoint per op (two statements each). Nearly every batch
            # commits whole; one whose op fails is rolled back and run again op by op below.
            try:
                with _immediate(conn):
                    return _run_bare_batch(conn, ops)
            except _OpFailed:
                self.reruns += 1
        with _immediate(conn):
            return [_run_in_savepoint(conn, op) for op in ops]


def _run_bare_batch(conn: sqlite3.Connection, ops: list[Write]) -> list[tuple[bool, Any]]:
    results: list[tuple[bool, Any]] = []
    start = 0
    while start < len(ops):
        op, end = ops[start], start + 1
        many = _MANY.get(op.func)
        if many is not None:
            # A run of the same insert: one multi-row statement for many of them.
            while end < len(ops) and ops[end].func is op.func:
                end += 1
            values = _run_bare(conn, partial(many, ops=ops[start:end]))
            results += [(True, value) for value in values]
        else:
            results.append((True, _run_bare(conn, op)))
        start = end
    return results


class _Many(Protocol):
    def __call__(self, conn: sqlite3.Connection, *, ops: list[Write]) -> list[Any]: ...


def _insert_many(conn: sqlite3.Connection, *, ops: list[Write]) -> list[tuple[str, bool]]:
    return records.insert_many(conn, [op.keywords["inv"] for op in ops])


def _insert_finished_many(conn: sqlite3.Connection, *, ops: list[Write]) -> list[None]:
    records.insert_finished_many(conn, [(op.keywords["inv"], op.keywords["o"]) for op in ops])
    return [None] * len(ops)


def _mark_running_many(conn: sqlite3.Connection, *, ops: list[Write]) -> list[None]:
    marks = [(k["id"], k["attempt"], k["started_at"], k["worker_pid"]) for k in _kwargs(ops)]
    if len({mark[0] for mark in marks}) < len(marks):  # one row twice: in order, one by one
        return [op(conn) for op in ops]
    records.mark_running_many(conn, marks)
    return [None] * len(ops)


def _finish_many(conn: sqlite3.Connection, *, ops: list[Write]) -> list[settle.Settled]:
    finished = [(k["id"], k["attempt"], k["o"], k["dead_letter"], k["now"]) for k in _kwargs(ops)]
    routed = any(k["route"] is not None for k in _kwargs(ops))
    if routed or len({row[0] for row in finished}) < len(finished):
        return [op(conn) for op in ops]
    return settle.finish_many(conn, finished)


def _kwargs(ops: list[Write]) -> list[dict[str, Any]]:
    return [op.keywords for op in ops]


# The writes whose consecutive runs in a bare batch share statements: queued invocations
# (every accepted event, records.insert), finished sync calls (records.insert_finished), the
# `running` marks of async attempts and their final records without a destination.
_MANY: dict[Callable[..., Any], _Many] = {
    records.insert: _insert_many,
    records.insert_finished: _insert_finished_many,
    records.mark_running: _mark_running_many,
    settle.finish: _finish_many,
}


class _OpFailed(Exception):
    """An op of an optimistic batch failed: the batch is rolled back and run op by op."""


def _run_bare(conn: sqlite3.Connection, op: Op) -> Any:
    try:
        return op(conn)
    except Exception as exc:
        if isinstance(exc, sqlite3.Error) and _unavailable(exc):
            raise  # the whole batch fails, as it would op by op
        raise _OpFailed from exc


def _run_in_savepoint(conn: sqlite3.Connection, op: Op) -> tuple[bool, Any]:
    conn.execute("SAVEPOINT op")
    try:
        result = op(conn)
    except Exception as exc:
        if isinstance(exc, sqlite3.Error) and _unavailable(exc):
            raise
        conn.execute("ROLLBACK TO op")  # undo this op alone; the batch goes on
        conn.execute("RELEASE op")
        return False, exc
    conn.execute("RELEASE op")
    return True, result


def _unavailable(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _UNAVAILABLE_CODES


def _nothing(conn: sqlite3.Connection) -> None:
    return None


BARRIER = write(_nothing, REPEATABLE)  # not relaxed: a barrier's batch commits with FULL
