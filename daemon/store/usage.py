"""Usage metering: what the functions' attempts used, per UTC day, kept apart from the records.

The `usage_daily` table and the trigger that fills it are schema (migration v6 in
daemon/store/migrations.py): every attempt is counted as its attempts row is first written,
in the same transaction, so no roll-up step can miss one or count one twice, a kill -9
included, and retention can prune the records without losing their usage. Here: the queries
that read it, and the memory sizes the trigger multiplies billed time by.
"""

from __future__ import annotations

import sqlite3

DAY_S = 86_400

# Totals per day (newest first) or per function, from the first day `?` on.
_SUMS = (
    "sum(requests) AS requests, sum(errors) AS errors, sum(duration_ms) AS duration_ms,"
    " sum(billed_ms) AS billed_ms, sum(mb_ms) AS mb_ms"
)
BY_DAY = f"SELECT day, {_SUMS} FROM usage_daily WHERE day >= ? GROUP BY day ORDER BY day DESC"
BY_FUNCTION = (
    f"SELECT function, {_SUMS} FROM usage_daily WHERE day >= ? GROUP BY function ORDER BY function"
)


def save_memory(conn: sqlite3.Connection, memory_mb: dict[str, int]) -> None:
    """Record each function's configured memory_mb (others keep theirs: old records' names)."""
    conn.executemany(
        "INSERT INTO usage_memory (function, memory_mb) VALUES (?, ?)"
        " ON CONFLICT (function) DO UPDATE SET memory_mb = excluded.memory_mb"
        " WHERE usage_memory.memory_mb != excluded.memory_mb",
        sorted(memory_mb.items()),
    )
