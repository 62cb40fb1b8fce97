"""The rows of a batch invocation (daemon/batches.py): its items marked running in one write, and
the batch's record with every item's outcome in one more. Run in the store's database thread;
like records.py's writes, they only run SQL (a Route only decides), so they may run again after
their transaction was rolled back (daemon/store/batches.py).
"""

from __future__ import annotations

import sqlite3

import msgspec

from daemon.models import Outcome
from daemon.store import records, settle
from daemon.store.records import NewInvocation
from daemon.store.settle import Route, Settled


class BatchItem(msgspec.Struct, frozen=True):
    """One item's attempt in a batch and what it comes to: final, a retry, or a dead letter."""

    id: str
    attempt: int
    outcome: Outcome
    next_attempt_at: float | None = None  # retried then (the row is queued again)
    dead_letter: str | None = None  # final, dead-lettered for this reason


_MARK_RUNNING = (
    "UPDATE invocations SET status = 'running', attempt = ?, started_at = ?, worker_pid = NULL,"
    " next_attempt_at = NULL, batch_id = ? WHERE id IN (SELECT value FROM json_each(?))"
)
_ATTEMPT_IN_BATCH = "UPDATE attempts SET batch_id = ? WHERE invocation_id = ? AND attempt = ?"
_FINISH_ALL = settle.FINISH + " WHERE id IN (SELECT value FROM json_each(?))"


def mark_running(
    conn: sqlite3.Connection, batch_id: str, items: list[tuple[str, int]], started_at: float
) -> None:
    """Mark (id, attempt) items running in batch `batch_id`, all or none.

    One statement per attempt number (a batch's items nearly always share one), not one per
    item: each statement hands the GIL to the event loop and back (daemon/store/batches.py).
    """
    by_attempt: dict[int, list[str]] = {}
    for id, attempt in items:
        by_attempt.setdefault(attempt, []).append(id)
    marked = 0
    for attempt, ids in by_attempt.items():
        marked += conn.execute(_MARK_RUNNING, (attempt, started_at, batch_id, _json(ids))).rowcount
    if marked != len(items):
        raise LookupError(f"batch {batch_id}: {len(items) - marked} item(s) not in the store")


def settle_batch(
    conn: sqlite3.Connection,
    batch: NewInvocation,
    outcome: Outcome,
    items: list[BatchItem],
    now: float,
    route: Route | None,
) -> list[Settled | None]:
    """Write the batch's own record and each item's outcome; None for an item that is retried.

    Items end as settle.finish ends a single invocation (their destinations routed in the same
    transaction); each attempts row names the batch it ran in. Items that end alike (the same
    outcome, attempt and dead letter, and no destination to route: nearly every item of a
    batch that succeeded) are finished by one UPDATE and their attempts rows written by
    multi-row INSERTs, rather than by two statements or more each.
    """
    # A write repeated after a commit that failed yet reached the disk finds its row there
    # and keeps it (its attempt is counted once in usage_daily, v7).
    if conn.execute("SELECT 1 FROM invocations WHERE id = ?", (batch.id,)).fetchone() is None:
        records.insert_finished(conn, batch, outcome)
    conn.execute("UPDATE invocations SET batch_id = id WHERE id = ?", (batch.id,))
    settled: list[Settled | None] = [None] * len(items)
    alike: dict[tuple[int, int, str | None], list[int]] = {}
    one_by_one: list[BatchItem] = []  # their attempts rows are written without the batch
    for i, item in enumerate(items):
        if item.next_attempt_at is not None:
            records.requeue(conn, item.id, item.attempt, item.outcome, item.next_attempt_at)
            one_by_one.append(item)
        elif route is not None or item.outcome.worker_pid is None:
            settled[i] = settle.finish(
                conn, item.id, item.attempt, item.outcome, item.dead_letter, now, route
            )
            one_by_one.append(item)
        else:
            key = (id(item.outcome), item.attempt, item.dead_letter)
            alike.setdefault(key, []).append(i)
    attempts: list[tuple[str, int, Outcome]] = []
    for group in alike.values():
        first = items[group[0]]
        values = settle.finish_values(first.attempt, first.outcome, first.dead_letter, now)
        ids = [items[i].id for i in group]
        if conn.execute(_FINISH_ALL, (*values, _json(ids))).rowcount != len(ids):
            raise LookupError(f"batch {batch.id}: an item is not in the store")
        done = Settled(first.outcome.status.value)
        for i in group:
            settled[i] = done
            attempts.append((items[i].id, first.attempt, first.outcome))
    records.record_attempts(conn, attempts, batch_id=batch.id)
    conn.executemany(_ATTEMPT_IN_BATCH, [(batch.id, item.id, item.attempt) for item in one_by_one])
    return settled


def _json(ids: list[str]) -> str:
    return msgspec.json.encode(ids).decode()
