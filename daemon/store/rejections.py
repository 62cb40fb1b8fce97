"""Records of inputs a trigger source could not turn into an event (a poison MQTT message, a
file that cannot be read, a cron fire whose event cannot be built).

Such an input is written as a final invocation that never ran: status `failed`, attempt 0, its
error, and dead-lettered for `reason`, so it shows in the dead-letter list. It is committed
like an accepted event (durably, under its dedupe key, with its cron fire's mark), so the
source may acknowledge it and a redelivery maps to the same record.
"""

from __future__ import annotations

import sqlite3

from daemon.models import Status
from daemon.store import cron, records
from daemon.store.cron import CronFire
from daemon.store.records import NewInvocation

_FINISH = (
    "UPDATE invocations SET ended_at = ?, error_type = ?, error_message = ?, result = ?,"
    " dead_letter_reason = ?, dead_lettered_at = ? WHERE id = ?"
)


def insert_rejected(
    conn: sqlite3.Connection,
    inv: NewInvocation,
    error_type: str,
    error_message: str,
    result: bytes,
    fire: CronFire | None,
) -> tuple[str, bool]:
    """Insert `inv` as failed and dead-lettered (`error_type` is the reason); see records.insert."""
    assert inv.status == Status.FAILED and inv.attempt == 0, inv
    invocation_id, created = records.insert(conn, inv)
    if created:
        params = (inv.queued_at, error_type, error_message, result, error_type, inv.queued_at)
        records.update_one(conn, _FINISH, (*params, invocation_id))
        if fire is not None:
            cron.mark_fire(conn, fire)
    return invocation_id, created
