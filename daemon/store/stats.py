"""What the dashboard shows of a time window (GET /v1/stats): per function and per trigger,
counts, errors and durations in equal buckets, and duration percentiles.

Run in the reader's thread in one snapshot (`window_stats`). The cost is bounded by the
window: one range scan of `invocations_queued` over the window's rows, grouped in SQLite (no
row reaches Python), then per function a percentile pick over at most PERCENTILE_SAMPLE of its
most recent rows (on `invocations_function_queued`) and its last record (one index probe).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from daemon.models import FINAL_STATUSES, Status

# p50/p95 are taken over at most this many of the window's latest finished invocations of a
# function, so a busy day costs what a busy quarter-hour does.
PERCENTILE_SAMPLE = 10_000
_ERRORS = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATUSES - {Status.SUCCEEDED}))

_BUCKETS = f"""
SELECT function, trigger, trigger_id, CAST((queued_at - :start) / :bucket_s AS INTEGER) AS bucket,
       COUNT(*) AS invocations,
       SUM(CASE WHEN status IN ({_ERRORS}) THEN 1 ELSE 0 END) AS errors,
       SUM(duration_ms) AS duration_sum,
       COUNT(duration_ms) AS durations,
       MAX(duration_ms) AS duration_max,
       MAX(queued_at) AS last_at,
       MAX(CASE WHEN status IN ({_ERRORS}) THEN queued_at END) AS last_error_at
FROM invocations
WHERE queued_at >= :start AND queued_at < :end
GROUP BY function, trigger, trigger_id, bucket
"""
# The k-th smallest duration among a function's latest PERCENTILE_SAMPLE finished ones.
_PICK = """
SELECT duration_ms FROM (
    SELECT duration_ms FROM invocations
    WHERE function = ? AND queued_at >= ? AND queued_at < ? AND duration_ms IS NOT NULL
    ORDER BY queued_at DESC LIMIT ?
) AS sample ORDER BY duration_ms LIMIT 1 OFFSET ?
"""
_LAST = """
SELECT id, status, queued_at, duration_ms FROM invocations
WHERE function = ? ORDER BY queued_at DESC LIMIT 1
"""


def window_stats(
    conn: sqlite3.Connection, functions: list[str], start: float, end: float, buckets: int
) -> dict[str, Any]:
    """Figures for `functions` from `start` to `end` in `buckets` equal buckets (oldest first).

    Per function: totals, "series" (invocations, errors, mean and max duration per bucket),
    p50_ms and p95_ms, the last record ever, and "triggers" by trigger id with their totals.
    """
    bucket_s = (end - start) / buckets
    conn.execute("BEGIN")  # one snapshot for every query below
    try:
        out = {name: _empty(buckets) for name in functions}
        params = {"start": start, "end": end, "bucket_s": bucket_s}
        for row in conn.execute(_BUCKETS, params):
            if (fn := out.get(row["function"])) is not None:
                _add(fn, row, min(row["bucket"], buckets - 1))
        for name, fn in out.items():
            _finish(conn, name, fn, start, end)
        return out
    finally:
        conn.execute("COMMIT")


def _empty(buckets: int) -> dict[str, Any]:
    return {
        "invocations": 0,
        "errors": 0,
        "duration_sum": 0.0,
        "durations": 0,
        "series": {
            "invocations": [0] * buckets,
            "errors": [0] * buckets,
            "duration_mean_ms": [None] * buckets,
            "duration_max_ms": [None] * buckets,
        },
        "triggers": {},
    }


def _add(fn: dict[str, Any], row: sqlite3.Row, at: int) -> None:
    """Fold one (trigger, bucket) group into its function's figures."""
    series = fn["series"]
    series["invocations"][at] += row["invocations"]
    series["errors"][at] += row["errors"]
    fn["invocations"] += row["invocations"]
    fn["errors"] += row["errors"]
    if row["durations"]:
        fn["duration_sum"] += row["duration_sum"]
        fn["durations"] += row["durations"]
        # Several trigger groups can share a bucket: the mean is kept as (sum, count) till _finish.
        sums = series.setdefault("_sums", {})
        total, count = sums.get(at, (0.0, 0))
        sums[at] = (total + row["duration_sum"], count + row["durations"])
        previous = series["duration_max_ms"][at]
        series["duration_max_ms"][at] = max(previous or 0.0, row["duration_max"])
    key = row["trigger_id"] or row["trigger"]
    trigger = fn["triggers"].setdefault(
        key,
        {"trigger": row["trigger"], "invocations": 0, "errors": 0, "last_at": None},
    )
    trigger["invocations"] += row["invocations"]
    trigger["errors"] += row["errors"]
    trigger["last_at"] = max(trigger["last_at"] or 0.0, row["last_at"])
    if row["last_error_at"] is not None:
        trigger["last_error_at"] = max(trigger.get("last_error_at") or 0.0, row["last_error_at"])


def _finish(
    conn: sqlite3.Connection, name: str, fn: dict[str, Any], start: float, end: float
) -> None:
    series = fn["series"]
    for at, (total, count) in series.pop("_sums", {}).items():
        series["duration_mean_ms"][at] = total / count
    durations, duration_sum = fn.pop("durations"), fn.pop("duration_sum")
    fn["duration_mean_ms"] = duration_sum / durations if durations else None
    sample = min(durations, PERCENTILE_SAMPLE)
    for key, q in (("p50_ms", 0.50), ("p95_ms", 0.95)):
        fn[key] = None
        if sample:
            offset = round((sample - 1) * q)
            row = conn.execute(_PICK, (name, start, end, sample, offset)).fetchone()
            fn[key] = row[0] if row else None
    for trigger in fn["triggers"].values():
        # Failing: the trigger's latest event in the window ended in an error.
        trigger["failing"] = trigger.pop("last_error_at", None) == trigger["last_at"]
    last = conn.execute(_LAST, (name,)).fetchone()
    fn["last"] = dict(last) if last else None
