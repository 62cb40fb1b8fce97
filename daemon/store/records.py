"""The invocation record's rows and SQL. The functions below run in the store's database thread.

sqlite.py owns the connections and the group-commit writer and re-exports the row types;
settle.py writes final records, with their destinations.
Each write here runs inside the writer's transaction, and may run a second time after that
transaction was rolled back (daemon/store/batches.py): so it runs SQL and has no other effects.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import msgspec

from daemon.models import Outcome, Status

T = TypeVar("T")

SUMMARY_COLUMNS = (
    "id, function, function_version, trigger, trigger_id, invocation_type, status, attempt,"
    " dedupe_key, queued_at, started_at, ended_at, next_attempt_at, duration_ms,"
    " billed_duration_ms, init_duration_ms, max_memory_mb, error_type, error_message, exit_code,"
    " signal, worker_pid, recoveries, parent_id, dead_letter_reason, dead_lettered_at, redrives,"
    " hops, node"
)
# What a log line needs of a record (daemon/tail.py record_lines), and where it pages.
LOG_COLUMNS = (
    "id, function, function_version, status, attempt, queued_at, started_at, ended_at,"
    " duration_ms, billed_duration_ms, init_duration_ms, max_memory_mb, error_type, logs"
)
QUEUED_COLUMNS = (
    "id, function, invocation_type, trigger, event, attempt, queued_at, next_attempt_at,"
    " retry_base, COALESCE(redriven_at, queued_at) AS age_from, function_version, trigger_id"
)


# Dedupe keys from `low` (included) to `high` (excluded), in key order (the UNIQUE index's).
DEDUPE_KEYS_IN = (
    "SELECT dedupe_key FROM invocations WHERE dedupe_key >= ? AND dedupe_key < ?"
    " ORDER BY dedupe_key"
)
LAST_DEDUPE_KEY_IN = (
    "SELECT MAX(dedupe_key) FROM invocations WHERE dedupe_key >= ? AND dedupe_key < ?"
)
# Appended to a condition on invocations: only the rows this node owns. A fleet's nodes share
# one PostgreSQL store, where daemon/store/dialect.py makes it a condition on `node`; SQLite has
# one node, and reads it as the comment it is.
OWNED = " /*owned*/"
ERROR_OF = "SELECT error_type, error_message FROM invocations WHERE id = ?"


class NewInvocation(msgspec.Struct, frozen=True):
    """An invocation as first written: queued, or already running (a sync call started at once)."""

    id: str
    function: str
    function_version: str
    trigger: str
    invocation_type: str  # 'sync' | 'async'
    event: bytes
    queued_at: float
    status: Status = Status.QUEUED
    trigger_id: str | None = None
    dedupe_key: str | None = None
    parent_id: str | None = None
    hops: int = 0  # destination hops from the first invocation of its chain
    attempt: int = 0
    started_at: float | None = None
    worker_pid: int | None = None


class QueuedInvocation(msgspec.Struct, frozen=True):
    """A row waiting for an attempt, as the dispatcher resumes it after a restart or redrive."""

    id: str
    function: str
    invocation_type: str
    trigger: str
    event: bytes
    attempt: int  # attempts made so far
    queued_at: float
    next_attempt_at: float | None  # a retry waits until then; None: run when a slot is free
    retry_base: int  # the retry budget counts attempts after this one (a redrive moves it)
    age_from: float  # the event's age counts from here: accepted, or last redriven
    function_version: str = "$LATEST"  # the version it is bound to (daemon/versions.py)
    trigger_id: str | None = None  # `NAME#i`: which trigger, so a batched one is batched again


# --- writes --------------------------------------------------------------------------------


def insert(conn: sqlite3.Connection, inv: NewInvocation) -> tuple[str, bool]:
    cur = conn.execute(_INSERT_ONE, _insert_values(inv))
    if cur.rowcount == 0:
        return _known_key(conn, inv), False
    return inv.id, True


def insert_many(conn: sqlite3.Connection, invs: Sequence[NewInvocation]) -> list[tuple[str, bool]]:
    """insert() of each, in order, with one statement for up to MAX_ROWS of them (for the
    same reason as insert_finished_many). When a statement put in fewer rows than it had, a
    dedupe_key was already stored (or taken by an earlier row of the same statement): each
    of its rows is then looked up by its key, and one that did not go in gets the stored id,
    as insert() gives it."""
    answers: list[tuple[str, bool]] = []
    for n, rows in chunks(invs):
        params: list[Any] = []
        for inv in rows:
            params += _insert_values(inv)
        if conn.execute(_INSERTS[n], params).rowcount == n:
            answers += [(inv.id, True) for inv in rows]
            continue
        for inv in rows:
            stored = inv.id if inv.dedupe_key is None else _known_key(conn, inv)
            answers.append((stored, stored == inv.id))
    return answers


def _insert_values(inv: NewInvocation) -> tuple[Any, ...]:
    return (
        inv.id,
        inv.function,
        inv.function_version,
        inv.trigger,
        inv.trigger_id,
        inv.invocation_type,
        str(inv.status),
        inv.attempt,
        inv.dedupe_key,
        inv.queued_at,
        inv.started_at,
        inv.worker_pid,
        inv.parent_id,
        inv.hops,
        inv.event,
    )


def _known_key(conn: sqlite3.Connection, inv: NewInvocation) -> str:
    row = conn.execute("SELECT id FROM invocations WHERE dedupe_key = ?", (inv.dedupe_key,))
    return str(row.fetchone()[0])


def insert_finished(conn: sqlite3.Connection, inv: NewInvocation, o: Outcome) -> None:
    insert_finished_many(conn, [(inv, o)])


def insert_finished_many(
    conn: sqlite3.Connection, finished: Sequence[tuple[NewInvocation, Outcome]]
) -> None:
    """insert_finished of every pair, in order: two statements for up to MAX_ROWS of them.

    Each statement hands the GIL to the event loop and takes it back (sqlite3 lets go of it
    while SQLite works), and under load that hand-off costs the loop more than SQLite's work.
    """
    for n, rows in chunks(finished):
        params: list[Any] = []
        for inv, o in rows:
            params += (
                inv.id,
                inv.function,
                inv.function_version,
                inv.trigger,
                inv.trigger_id,
                inv.invocation_type,
                str(o.status),
                inv.attempt,
                inv.queued_at,
                o.started_at,
                o.ended_at,
                o.duration_ms,
                o.billed_duration_ms,
                o.init_duration_ms,
                o.max_memory_mb,
                o.error_type,
                o.error_message,
                o.exit_code,
                o.signal,
                o.worker_pid,
                inv.parent_id,
                inv.event,
                o.payload,
                o.logs,
            )
        conn.execute(_FINISHED[n], params)
        params = []
        for inv, o in rows:  # the row's pid is the outcome's: no lookup of the row needed
            params += _attempt_values(inv.id, inv.attempt, o)
            params.append(o.worker_pid)
        conn.execute(_ATTEMPTS_WITH_PID[n], params)


def record_attempts(
    conn: sqlite3.Connection,
    attempts: Sequence[tuple[str, int, Outcome]],
    batch_id: str | None = None,
) -> None:
    """record_attempt of each (id, attempt, outcome): one statement for up to MAX_ROWS of
    those whose outcome carries its worker pid, one each for the others (the pid is then the
    row's). With `batch_id`, every row names the batch it ran in, and each outcome must carry
    its pid."""
    with_pid = [a for a in attempts if a[2].worker_pid is not None]
    if batch_id is not None and len(with_pid) < len(attempts):
        raise ValueError(f"batch {batch_id}: an item's outcome has no worker pid")
    statements = _ATTEMPTS_WITH_PID if batch_id is None else _ATTEMPTS_IN_BATCH
    extra = () if batch_id is None else (batch_id,)
    for n, rows in chunks(with_pid):
        params: list[Any] = []
        for id, attempt, o in rows:
            params += (*_attempt_values(id, attempt, o), o.worker_pid, *extra)
        conn.execute(statements[n], params)
    for id, attempt, o in attempts:
        if o.worker_pid is None:
            record_attempt(conn, id, attempt, o)


def chunks(rows: Sequence[T]) -> Iterator[tuple[int, Sequence[T]]]:
    """`rows` in chunks of 2**k rows (MAX_ROWS at most), each with its size: a multi-row
    statement for each size is prepared once and then kept in sqlite3's statement cache."""
    done = 0
    while done < len(rows):
        n = 1 << (min(MAX_ROWS, len(rows) - done).bit_length() - 1)
        yield n, rows[done : done + n]
        done += n


# The worker_pid of a `running` mark written ahead of its attempt's start
# (Dispatcher._mark_ahead): no worker yet. Recovery tells such a mark from a started attempt by
# it (settle.recover_running), as long as no real pid was written over it.
MARKED_AHEAD = 0


def mark_running(
    conn: sqlite3.Connection, id: str, attempt: int, started_at: float, worker_pid: int | None
) -> None:
    update_one(
        conn,
        "UPDATE invocations SET status = 'running', attempt = ?, started_at = ?,"
        " worker_pid = ?, next_attempt_at = NULL WHERE id = ?" + OWNED,
        (attempt, started_at, worker_pid, id),
    )


def mark_running_many(
    conn: sqlite3.Connection, marks: Sequence[tuple[str, int, float, int | None]]
) -> None:
    """mark_running of each (id, attempt, started_at, worker_pid), ids all different: one
    UPDATE for up to MAX_ROWS of them (SQLite's batches only: UPDATE ... FROM), one each
    below JOINED_FROM rows."""
    for n, rows in chunks(marks):
        if n < JOINED_FROM:
            for row in rows:
                mark_running(conn, *row)
        elif conn.execute(_MARKS[n], [value for row in rows for value in row]).rowcount != n:
            raise LookupError(f"no invocation for some of {[row[0] for row in rows]!r}")


def unmark_running(conn: sqlite3.Connection, items: list[tuple[str, int]]) -> None:
    """Take back `running` marks of (id, attempt)s that never started: queued again, the
    attempt not made. A row that moved on since (or was never marked) is left alone."""
    conn.executemany(
        "UPDATE invocations SET status = 'queued', attempt = ?, started_at = NULL"
        " WHERE id = ? AND status = 'running' AND attempt = ?" + OWNED,
        [(attempt - 1, id, attempt) for id, attempt in items],
    )


def requeue(
    conn: sqlite3.Connection, id: str, attempt: int, o: Outcome, next_attempt_at: float
) -> None:
    # The failed attempt's error stays visible on the row while it waits for the retry.
    update_one(
        conn,
        "UPDATE invocations SET status = 'queued', attempt = ?, next_attempt_at = ?,"
        " error_type = ?, error_message = ?, exit_code = ?, signal = ?,"
        " worker_pid = COALESCE(?, worker_pid), logs = ? WHERE id = ?" + OWNED,
        (
            attempt,
            next_attempt_at,
            o.error_type,
            o.error_message,
            o.exit_code,
            o.signal,
            o.worker_pid,
            o.logs,
            id,
        ),
    )
    record_attempt(conn, id, attempt, o)


def redrive(
    conn: sqlite3.Connection,
    ids: list[str] | None,
    function: str | None,
    functions: list[str],
    now: float,
    node: str | None = None,
) -> list[QueuedInvocation]:
    """Queue dead letters again, of configured functions only, with a fresh budget and age;
    `node` (in a fleet) owns them from now on: the one that runs them."""
    sql = (
        "UPDATE invocations SET status = 'queued', dead_letter_reason = NULL,"
        " dead_lettered_at = NULL, next_attempt_at = NULL, redrives = redrives + 1,"
        " retry_base = attempt, redriven_at = ?, node = COALESCE(?, node)"
        " WHERE dead_letter_reason IS NOT NULL"
        " AND function IN (SELECT value FROM json_each(?))"
    )
    params: list[Any] = [now, node, msgspec.json.encode(functions).decode()]
    if ids is not None:
        sql += " AND id IN (SELECT value FROM json_each(?))"
        params.append(msgspec.json.encode(ids).decode())
    if function is not None:
        sql += " AND function = ?"
        params.append(function)
    cur = conn.execute(sql + " RETURNING " + QUEUED_COLUMNS, params)
    names = [d[0] for d in cur.description]
    rows = [QueuedInvocation(**dict(zip(names, r, strict=True))) for r in cur.fetchall()]
    return sorted(rows, key=lambda q: (q.queued_at, q.id))


def record_attempt(conn: sqlite3.Connection, id: str, attempt: int, o: Outcome) -> None:
    # REPLACE: a write repeated after an ambiguous commit failure stays idempotent. Without a
    # pid in the outcome, it falls back to the one mark_running stored, which the caller just
    # copied into the row; with one (nearly always), the row need not be looked up.
    values = _attempt_values(id, attempt, o)
    if o.worker_pid is not None:
        conn.execute(_ATTEMPTS_WITH_PID[1], (*values, o.worker_pid))
    else:
        conn.execute(_ATTEMPT_PID_FROM_ROW, (*values, id))


def _attempt_values(id: str, attempt: int, o: Outcome) -> tuple[Any, ...]:
    """An attempts row in _ATTEMPT's column order, but for the last one (worker_pid)."""
    return (
        id,
        attempt,
        str(o.status),
        o.started_at,
        o.ended_at,
        o.duration_ms,
        o.error_type,
        o.error_message,
        o.exit_code,
        o.signal,
        o.logs,
    )


def _values(width: int, rows: int) -> str:
    return " VALUES " + ", ".join(["(" + ", ".join(["?"] * width) + ")"] * rows)


# Statements for 1, 2, 4 ... MAX_ROWS rows, so that sqlite3 keeps each prepared.
MAX_ROWS = 64
SIZES = [1 << k for k in range(MAX_ROWS.bit_length())]
_FINISHED = {
    n: "INSERT INTO invocations (id, function, function_version, trigger, trigger_id,"
    " invocation_type, status, attempt, queued_at, started_at, ended_at, duration_ms,"
    " billed_duration_ms, init_duration_ms, max_memory_mb, error_type, error_message,"
    " exit_code, signal, worker_pid, parent_id, event, result, logs)" + _values(24, n)
    for n in SIZES
}
_INSERT = (
    "INSERT INTO invocations (id, function, function_version, trigger, trigger_id,"
    " invocation_type, status, attempt, dedupe_key, queued_at, started_at, worker_pid,"
    " parent_id, hops, event)"
)
_SKIP_KNOWN_KEY = " ON CONFLICT (dedupe_key) DO NOTHING"
_INSERT_ONE = _INSERT + _values(15, 1) + _SKIP_KNOWN_KEY
_INSERTS = {n: _INSERT + _values(15, n) + _SKIP_KNOWN_KEY for n in SIZES}


# The fewest rows an update_from() statement is used for. Its VALUES list is materialized and
# joined, which costs more than separate UPDATEs by id for one or two rows (SQLite 3.40, one
# thread, no GIL contention, per row: 16.5 against 9.5 us for one mark, 11.1 against 9.5 for
# two, 8.6 against 9.3 for four, 6.3 against 9.2 for sixteen; a final record 37.8 against
# 27.9, 29.8 against 27.5, 23.8 against 27.7, 19.7 against 26.8).
JOINED_FROM = 4


def update_from(columns: str, rows: int, sets: str) -> str:
    """An UPDATE of `rows` invocations, each with its own values: VALUES rows named `columns`
    (the first one `id`) as `v`, joined to the invocations by id. SQLite (3.33+) only. It
    starts with UPDATE, not WITH, so that sqlite3 reports its rowcount."""
    names = [name.strip() for name in columns.split(",")]
    named = ", ".join(f"column{i} AS {name}" for i, name in enumerate(names, start=1))
    values = _values(len(names), rows).removeprefix(" ")
    return f"UPDATE invocations SET {sets} FROM (SELECT {named} FROM ({values})) AS v" + (
        " WHERE invocations.id = v.id" + OWNED
    )


_MARKS = {
    n: update_from(
        "id, attempt, started_at, worker_pid",
        n,
        "status = 'running', attempt = v.attempt, started_at = v.started_at,"
        " worker_pid = v.worker_pid, next_attempt_at = NULL",
    )
    for n in SIZES
}
_ATTEMPT = (
    "INSERT OR REPLACE INTO attempts (invocation_id, attempt, status, started_at, ended_at,"
    " duration_ms, error_type, error_message, exit_code, signal, logs, worker_pid)"
)
_ATTEMPTS_WITH_PID = {n: _ATTEMPT + _values(12, n) for n in SIZES}
_ATTEMPTS_IN_BATCH = {
    n: _ATTEMPT.replace("worker_pid)", "worker_pid, batch_id)") + _values(13, n) for n in SIZES
}
_ATTEMPT_PID_FROM_ROW = (
    _ATTEMPT + " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, worker_pid FROM invocations WHERE id = ?"
)


def update_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    if conn.execute(sql, params).rowcount != 1:
        raise LookupError(f"no invocation {params[-1]!r}")


# --- reads (on the read-only connection) ------------------------------------------------------


def fetch_record(conn: sqlite3.Connection, id: str) -> dict[str, Any] | None:
    conn.execute("BEGIN")  # one snapshot for the row and its attempts
    try:
        row = conn.execute("SELECT * FROM invocations WHERE id = ?", (id,)).fetchone()
        if row is None:
            return None
        record = dict(row)
        record.pop("seq", None)  # PostgreSQL's stand-in for the rowid, not part of the record
        record["attempts"] = [
            dict(a)
            for a in conn.execute(
                "SELECT * FROM attempts WHERE invocation_id = ? ORDER BY attempt", (id,)
            )
        ]
        if record.get("batch_id") == id:  # a batch invocation: what each of its items came to
            record["items"] = [
                dict(a)
                for a in conn.execute(
                    "SELECT a.invocation_id, a.attempt, a.status, a.error_type FROM attempts a"
                    " JOIN invocations i ON i.id = a.invocation_id WHERE a.batch_id = ?"
                    " ORDER BY i.queued_at, i.id",
                    (id,),
                )
            ]
        return record
    finally:
        conn.execute("COMMIT")
