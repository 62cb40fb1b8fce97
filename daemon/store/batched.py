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
    " next_attempt_at = NULL, batch_id = ? WHERE id = ?"
)
_ATTEMPT_IN_BATCH = "UPDATE attempts SET batch_id = ? WHERE invocation_id = ? AND attempt = ?"


def mark_running(
    conn: sqlite3.Connection, batch_id: str, items: list[tuple[str, int]], started_at: float
) -> None:
    """Mark (id, attempt) items running in batch `batch_id`, all or none."""
    cur = conn.executemany(
        _MARK_RUNNING, [(attempt, started_at, batch_id, id) for id, attempt in items]
    )
    if cur.rowcount != len(items):
        raise LookupError(f"batch {batch_id}: {len(items) - cur.rowcount} item(s) not in the store")


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
    transaction); each attempts row names the batch it ran in.
    """
    # A write repeated after a commit that failed yet reached the disk finds its row there
    # and keeps it (its attempt is counted once in usage_daily, v7).
    if conn.execute("SELECT 1 FROM invocations WHERE id = ?", (batch.id,)).fetchone() is None:
        records.insert_finished(conn, batch, outcome)
    conn.execute("UPDATE invocations SET batch_id = id WHERE id = ?", (batch.id,))
    settled: list[Settled | None] = []
    for item in items:
        if item.next_attempt_at is not None:
            records.requeue(conn, item.id, item.attempt, item.outcome, item.next_attempt_at)
            settled.append(None)
        else:
            settled.append(
                settle.finish(
                    conn, item.id, item.attempt, item.outcome, item.dead_letter, now, route
                )
            )
    conn.executemany(_ATTEMPT_IN_BATCH, [(batch.id, item.id, item.attempt) for item in items])
    return settled
