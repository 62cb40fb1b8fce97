"""An invocation's final record and where its outcome goes, written in one transaction.

When an async invocation reaches its final outcome (success, or a dead letter), its final write
also routes its destination, in the same savepoint: the outcome and its destination are
committed together or not at all, so a crash in between can neither lose nor repeat a delivery.
What the destination becomes is decided by the caller's `Route` (daemon/destinations/routing.py
decides which destination, the record's shape, the hop limit); this module reads the final
record for it and writes what it decided:

- a new queued invocation (`function:NAME`), or one recorded as a dead letter instead of run
  (a chain that went too deep), with its dedupe key so a repeated write adds nothing;
- an outbox row (`mqtt:TOPIC`, `webhook:URL`) for daemon/destinations/relay.py to deliver.

These functions run in the store's database thread and, like records.py's, may run again after
their transaction was rolled back (daemon/store/batches.py): a `Route` only decides, and what
was routed is returned, never kept, so a rerun's result replaces the rolled-back one's.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from daemon.models import Outcome, Status
from daemon.retry import Verdict
from daemon.store import outbox, records
from daemon.store.records import (
    OWNED,
    NewInvocation,
    QueuedInvocation,
    record_attempt,
    update_one,
)

INTERRUPTED_ERROR_TYPE = "Lambdaemon.Interrupted"
INTERRUPTED_MESSAGE = "the daemon stopped while this attempt was running"
INTERRUPTED_AHEAD_MESSAGE = "the daemon stopped as this attempt was about to start, or just after"


class FinalRecord(msgspec.Struct, frozen=True):
    """An invocation's final record, as a Route reads it."""

    id: str
    function: str
    invocation_type: str
    status: str
    attempt: int
    hops: int  # destination hops from the first invocation of its chain
    event: bytes
    result: bytes | None
    error_type: str | None
    error_message: str | None
    dead_letter_reason: str | None


class Destination(msgspec.Struct, frozen=True):
    """What a Route decided one final outcome becomes."""

    kind: str  # function | mqtt | webhook
    condition: str  # Success | RetriesExhausted | EventAgeExceeded
    destination: str  # as configured
    target: str  # the function, topic or URL
    record: bytes  # Lambda's destination record
    child: NewInvocation | None = None  # function: the invocation to queue
    stopped: tuple[str, str] | None = None  # function: (reason, message) to record, not run it


class Route(Protocol):
    """Decides where final outcomes go; called in the database thread, so it only reads."""

    def __call__(self, final: FinalRecord, *, fresh_result: bool, now: float) -> Destination | None:
        """`final`'s destination, or None when its outcome goes nowhere.

        `fresh_result`: the final write stored this attempt's result, the response payload;
        otherwise the payload is rebuilt from the recorded error.
        """
        ...


class Routed(msgspec.Struct, frozen=True):
    """Where one final outcome went: the dispatcher logs it, runs `child` or wakes delivery."""

    kind: str  # function | mqtt | webhook | stopped (a function hop recorded, not run)
    invocation_id: str  # the invocation whose outcome this is
    function: str
    condition: str  # Success | RetriesExhausted | EventAgeExceeded
    destination: str  # as configured
    hops: int = 0  # function and stopped: the new invocation's hops
    child: QueuedInvocation | None = None  # function: the queued invocation to run
    dead_letter_id: str | None = None  # stopped: the hop recorded instead of run
    chain_root: str | None = None  # stopped: the chain's first invocation
    outbox_id: int | None = None  # mqtt, webhook


class Settled(msgspec.Struct, frozen=True):
    """An invocation's final write: the status it ends with, and where its outcome went."""

    status: str
    routed: Routed | None = None


class Recovery(msgspec.Struct, frozen=True):
    """What recover() did with the rows a dead daemon left 'running'."""

    requeued: list[str]  # async with budget left: the attempt is recorded crashed, the row queued
    crashed: list[str]  # sync rows: crashed for good (the caller owns retries)
    dead_lettered: list[tuple[str, str]] = msgspec.field(default_factory=list)  # (id, reason)
    routed: list[Routed] = msgspec.field(default_factory=list)  # the dead letters' destinations


# (function, attempt that was interrupted, retry_base, age_from) -> what to do with the row
Decide = Callable[[str, int, int, float], Verdict]


# --- the final writes ---------------------------------------------------------------------------


# An invocation's final fields (finish_values, in order); the caller adds its WHERE.
FINISH = (
    "UPDATE invocations SET status = ?, attempt = ?, started_at = ?, ended_at = ?,"
    " next_attempt_at = NULL, duration_ms = ?, billed_duration_ms = ?,"
    " init_duration_ms = ?, max_memory_mb = ?, error_type = ?, error_message = ?,"
    " exit_code = ?, signal = ?, worker_pid = COALESCE(?, worker_pid), result = ?,"
    " logs = ?, dead_letter_reason = ?, dead_lettered_at = ?"
)


_FINISH_ONE = FINISH + " WHERE id = ?" + OWNED


def finish_values(attempt: int, o: Outcome, dead_letter: str | None, now: float) -> tuple[Any, ...]:
    return (
        str(o.status),
        attempt,
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
        o.payload,
        o.logs,
        dead_letter,
        now if dead_letter else None,
    )


def finish(
    conn: sqlite3.Connection,
    id: str,
    attempt: int,
    o: Outcome,
    dead_letter: str | None,
    now: float,
    route: Route | None,
) -> Settled:
    update_one(conn, _FINISH_ONE, (*finish_values(attempt, o, dead_letter, now), id))
    record_attempt(conn, id, attempt, o)
    routed = _route(conn, id, route, fresh_result=True) if route is not None else None
    return Settled(o.status.value, routed)


def finish_many(
    conn: sqlite3.Connection, finished: Sequence[tuple[str, int, Outcome, str | None, float]]
) -> list[Settled]:
    """finish() of each (id, attempt, outcome, dead_letter, now) without a destination to
    route, ids all different: one UPDATE and one attempts INSERT for up to MAX_ROWS of them
    (SQLite's batches only: UPDATE ... FROM; rows one by one below records.JOINED_FROM). An
    outcome without a worker pid takes the row's (record_attempt), one by one."""
    for n, rows in records.chunks(finished):
        if n < records.JOINED_FROM:
            for id, attempt, o, dead_letter, now in rows:
                update_one(conn, _FINISH_ONE, (*finish_values(attempt, o, dead_letter, now), id))
            continue
        params: list[Any] = []
        for id, attempt, o, dead_letter, now in rows:
            params += (id, *finish_values(attempt, o, dead_letter, now))
        if conn.execute(_FINISHES[n], params).rowcount != n:
            raise LookupError(f"no invocation for some of {[row[0] for row in rows]!r}")
    records.record_attempts(conn, [(id, attempt, o) for id, attempt, o, _, _ in finished])
    return [Settled(o.status.value) for _, _, o, _, _ in finished]


_FINISHES = {
    n: records.update_from(
        "id, status, attempt, started_at, ended_at, duration_ms, billed_duration_ms,"
        " init_duration_ms, max_memory_mb, error_type, error_message, exit_code, signal,"
        " worker_pid, result, logs, dead_letter_reason, dead_lettered_at",
        n,
        "status = v.status, attempt = v.attempt, started_at = v.started_at,"
        " ended_at = v.ended_at, next_attempt_at = NULL, duration_ms = v.duration_ms,"
        " billed_duration_ms = v.billed_duration_ms, init_duration_ms = v.init_duration_ms,"
        " max_memory_mb = v.max_memory_mb, error_type = v.error_type,"
        " error_message = v.error_message, exit_code = v.exit_code, signal = v.signal,"
        " worker_pid = COALESCE(v.worker_pid, invocations.worker_pid), result = v.result,"
        " logs = v.logs, dead_letter_reason = v.dead_letter_reason,"
        " dead_lettered_at = v.dead_lettered_at",
    )
    for n in records.SIZES
}


def record_sync_final(conn: sqlite3.Connection, inv: NewInvocation, o: Outcome, now: float) -> None:
    """A sync call's final record written late (daemon/deferred.py): the whole finished row, or
    the final fields of its `running` row when that one was written (a call still running after
    VISIBLE_AFTER_S) or when an earlier try committed after all. So a repeat adds nothing."""
    if conn.execute("SELECT 1 FROM invocations WHERE id = ?", (inv.id,)).fetchone() is None:
        records.insert_finished(conn, inv, o)
    else:
        finish(conn, inv.id, 1, o, None, now, None)


def dead_letter_waiting(
    conn: sqlite3.Connection, id: str, reason: str, now: float, route: Route | None
) -> Settled:
    """Dead-letter a queued retry without running it; it keeps its last attempt's status."""
    last = conn.execute(
        "SELECT a.status, a.ended_at, a.duration_ms FROM invocations i LEFT JOIN attempts a"
        " ON a.invocation_id = i.id AND a.attempt = i.attempt"
        " WHERE i.id = ? AND i.status = 'queued'",
        (id,),
    ).fetchone()
    if last is None:
        raise LookupError(f"no queued invocation {id!r}")
    status = last[0] or Status.FAILED.value  # every retry follows a recorded attempt
    update_one(
        conn,
        "UPDATE invocations SET status = ?, ended_at = ?, duration_ms = ?,"
        " next_attempt_at = NULL, dead_letter_reason = ?, dead_lettered_at = ? WHERE id = ?"
        + OWNED,
        (status, last[1], last[2], reason, now, id),
    )
    routed = _route(conn, id, route, fresh_result=False) if route is not None else None
    return Settled(str(status), routed)


def recover_running(
    conn: sqlite3.Connection, now: float, decide: Decide, route: Route | None
) -> Recovery:
    """Record each interrupted attempt as crashed, then retry or dead-letter it by the policy.

    Each dead letter is routed right after its update, in the same transaction.

    An attempt marked `running` ahead of its start (worker_pid MARKED_AHEAD, see
    Dispatcher._mark_ahead) may never have run. It is recorded crashed all the same (its handler
    may have started in the moment before the crash, and every run must be a recorded
    attempt), but the first time an invocation is found so it is queued again even when the
    policy would dead-letter it: an event is never dead-lettered by an attempt that perhaps did
    not run. Found so again, the policy decides, so an event whose handler keeps taking the
    daemon down still ends.
    """
    rows = conn.execute(
        f"SELECT {INTERRUPTED_COLUMNS} FROM invocations WHERE status = 'running'{OWNED}"
        " ORDER BY queued_at, id"
    ).fetchall()
    return settle_interrupted(conn, rows, now, decide, route)


# What settle_interrupted needs of each row left `running`.
INTERRUPTED_COLUMNS = (
    "id, function, invocation_type, attempt, started_at, worker_pid, retry_base,"
    " COALESCE(redriven_at, queued_at), batch_id, recoveries, node"
)


def settle_interrupted(
    conn: sqlite3.Connection, rows: list[Any], now: float, decide: Decide, route: Route | None
) -> Recovery:
    """recover_running's work on `rows` (INTERRUPTED_COLUMNS), the rows of attempts that a dead
    daemon left `running`: also what a node taking over a dead node's work does with them
    (daemon/store/fleet.py). Each crashed attempt is recorded as the dead node's."""
    recovery = Recovery(requeued=[], crashed=[])
    for row in rows:
        id, function, kind, attempt, started_at, worker_pid, retry_base, age_from, batch, n = row[
            :10
        ]
        node = row[10]
        ahead = worker_pid == records.MARKED_AHEAD and n == 0 and kind == "async"
        message = INTERRUPTED_AHEAD_MESSAGE if ahead else INTERRUPTED_MESSAGE
        worker_pid = None if worker_pid == records.MARKED_AHEAD else worker_pid
        conn.execute(
            "INSERT OR REPLACE INTO attempts (invocation_id, attempt, status, started_at,"
            " ended_at, error_type, error_message, worker_pid, batch_id, node)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                id,
                attempt,
                Status.CRASHED.value,
                started_at,
                now,
                INTERRUPTED_ERROR_TYPE,
                message,
                worker_pid,
                batch,  # the batch this attempt ran in, if any (daemon/batches.py)
                node,  # where it ran: the dead node, whoever records it
            ),
        )
        # The same policy as any failed attempt, so an event that keeps taking the daemon down
        # stops after its retries instead of looping forever.
        verdict = decide(function, attempt, retry_base, age_from) if kind == "async" else Verdict()
        if ahead and verdict.next_attempt_at is None:
            verdict = Verdict(next_attempt_at=now)  # not dead-lettered by a run that perhaps wasn't
        again = verdict.next_attempt_at is not None
        conn.execute(
            "UPDATE invocations SET status = ?, recoveries = recoveries + 1,"
            " next_attempt_at = ?, ended_at = ?, error_type = ?, error_message = ?,"
            " dead_letter_reason = ?, dead_lettered_at = ? WHERE id = ?",
            (
                Status.QUEUED.value if again else Status.CRASHED.value,
                verdict.next_attempt_at,
                None if again else now,
                INTERRUPTED_ERROR_TYPE,
                message,
                verdict.dead_letter,
                now if verdict.dead_letter else None,
                id,
            ),
        )
        if again:
            recovery.requeued.append(id)
        elif verdict.dead_letter:
            recovery.dead_lettered.append((id, verdict.dead_letter))
            routed = _route(conn, id, route, fresh_result=False) if route is not None else None
            if routed is not None:
                recovery.routed.append(routed)
        else:
            recovery.crashed.append(id)
    return recovery


# --- routing ------------------------------------------------------------------------------------


def _route(
    conn: sqlite3.Connection, invocation_id: str, route: Route, *, fresh_result: bool
) -> Routed | None:
    """Write what `route` decides for `invocation_id`'s final outcome; None: nothing new."""
    row = conn.execute(
        "SELECT id, function, invocation_type, status, attempt, hops, event, result, error_type,"
        " error_message, dead_letter_reason FROM invocations WHERE id = ?",
        (invocation_id,),
    ).fetchone()
    if row is None:
        return None
    final = FinalRecord(*row)
    now = time.time()
    dest = route(final, fresh_result=fresh_result, now=now)
    if dest is None:
        return None
    base = Routed(dest.kind, invocation_id, final.function, dest.condition, dest.destination)
    if dest.child is None:
        outbox_id = outbox.add(
            conn,
            invocation_id,
            final.attempt,
            dest.condition,
            dest.kind,
            dest.target,
            dest.record,
            now,
        )
        if outbox_id is None:
            return None  # this outcome was routed before (a repeated write)
        return msgspec.structs.replace(base, outbox_id=outbox_id)
    child = dest.child
    _, created = records.insert(conn, child)
    if not created:
        return None  # routed before: the child's dedupe key is taken
    if dest.stopped is None:
        queued = QueuedInvocation(
            id=child.id,
            function=child.function,
            invocation_type=child.invocation_type,
            trigger=child.trigger,
            event=child.event,
            attempt=child.attempt,
            queued_at=child.queued_at,
            next_attempt_at=None,
            retry_base=0,
            age_from=child.queued_at,
        )
        return msgspec.structs.replace(base, hops=child.hops, child=queued)
    reason, message = dest.stopped
    conn.execute(
        "UPDATE invocations SET ended_at = ?, error_type = ?, error_message = ?,"
        " dead_letter_reason = ?, dead_lettered_at = ? WHERE id = ?",
        (now, reason, message, reason, now, child.id),
    )
    return msgspec.structs.replace(
        base,
        kind="stopped",
        hops=final.hops,
        dead_letter_id=child.id,
        chain_root=_chain_root(conn, invocation_id),
    )


def _chain_root(conn: sqlite3.Connection, invocation_id: str) -> str:
    # Up the parent links while hops > 0: a replay's parent belongs to another chain.
    row = conn.execute(
        "WITH RECURSIVE chain (id, parent_id, hops) AS ("
        " SELECT id, parent_id, hops FROM invocations WHERE id = ?"
        " UNION ALL SELECT i.id, i.parent_id, i.hops FROM invocations i"
        " JOIN chain c ON i.id = c.parent_id WHERE c.hops > 0)"
        " SELECT id FROM chain ORDER BY hops LIMIT 1",
        (invocation_id,),
    ).fetchone()
    return str(row[0]) if row else invocation_id
