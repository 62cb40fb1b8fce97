"""The outbox: mqtt: and webhook: destination records waiting for their targets.

A row is written in the transaction of the invocation's final record (daemon/store/settle.py)
and deleted once its target acknowledged it, or kept as 'failed' when the target refused it for
good; daemon/destinations/relay.py delivers them.
"""

from __future__ import annotations

import sqlite3

import msgspec


class OutboxRow(msgspec.Struct, frozen=True):
    """A pending destination record, as daemon/destinations/relay.py delivers it."""

    id: int
    invocation_id: str
    attempt: int
    kind: str
    target: str
    record: bytes
    attempts: int  # delivery attempts so far

    @property
    def channel(self) -> str:
        # One broker serves every topic, so one outage blocks them all; webhooks go by URL.
        return "mqtt" if self.kind == "mqtt" else self.target

    @property
    def idempotency_key(self) -> str:
        """The same for every delivery of this record, so a receiver can drop repeats."""
        return f"{self.invocation_id}:{self.attempt}"


COUNTS = "SELECT status, COUNT(*) FROM outbox GROUP BY status"
# Pending rows, oldest first, but for the channels given as a JSON list (OutboxRow.channel).
DUE = (
    "SELECT id, invocation_id, attempt, kind, target, record, attempts FROM outbox"
    " WHERE status = 'pending' AND (CASE kind WHEN 'mqtt' THEN 'mqtt' ELSE target END)"
    " NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?"
)


def add(
    conn: sqlite3.Connection,
    invocation_id: str,
    attempt: int,
    condition: str,
    kind: str,
    target: str,
    record: bytes,
    now: float,
) -> int | None:
    """Queue a destination record; its id, or None if that attempt's is there already."""
    cur = conn.execute(
        "INSERT INTO outbox (invocation_id, attempt, condition, kind, target, record, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (invocation_id, attempt) DO NOTHING",
        (invocation_id, attempt, condition, kind, target, record, now),
    )
    return cur.lastrowid if cur.rowcount else None


def delivered(conn: sqlite3.Connection, id: int) -> None:
    conn.execute("DELETE FROM outbox WHERE id = ?", (id,))


def attempted(conn: sqlite3.Connection, id: int, error: str, now: float, *, final: bool) -> None:
    """Count a delivery attempt that did not succeed; `final` keeps it as failed for good."""
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ?, last_error = ?,"
        " status = CASE WHEN ? THEN 'failed' ELSE status END WHERE id = ?",
        (now, error[:2000], final, id),
    )
