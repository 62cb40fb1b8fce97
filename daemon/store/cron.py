"""The cron trigger's state: each trigger's last nominal fire, in the `cron_fires` table.

A fire's mark is written in the transaction that inserts its queued invocation (insert_fire),
so a fire is marked exactly when its invocation is committed, even across a kill -9; the
trigger (triggers/cron.py) catches up from the mark after a restart.
"""

from __future__ import annotations

import sqlite3

from daemon.store import records
from daemon.store.records import NewInvocation

# (trigger_id, nominal fire time as triggers/cron.py writes it: RFC 3339 UTC, whole seconds)
CronFire = tuple[str, str]

LAST_FIRE = "SELECT last_nominal FROM cron_fires WHERE trigger_id = ?"
_MARK = (
    "INSERT INTO cron_fires (trigger_id, last_nominal) VALUES (?, ?)"
    " ON CONFLICT (trigger_id) DO UPDATE SET last_nominal = excluded.last_nominal"
)


def insert_fire(conn: sqlite3.Connection, inv: NewInvocation, fire: CronFire) -> tuple[str, bool]:
    """records.insert, and when the row is new, the fire's mark with it (a duplicate: neither)."""
    invocation_id, created = records.insert(conn, inv)
    if created:
        mark_fire(conn, fire)
    return invocation_id, created


def mark_fire(conn: sqlite3.Connection, fire: CronFire) -> None:
    conn.execute(_MARK, fire)
