"""History: pages of invocation summaries, newest first, by keyset on (queued_at, rowid).

A page is "the next `limit` rows below the last one shown", never an offset: each filter has a
(column, queued_at) index (migration v6; the function's and the unfiltered one were there
before), which the page walks backwards from its upper bound, so a page costs the rows it
returns (plus those another filter skips), however many records the store holds. The rowid,
which every index entry carries, breaks ties between equal acceptance times without a sort.
Index entries of (column, queued_at) are a third the size of (column, id): a recorded
invocation writes them on the throughput path, and under size retention they are the pages
pruning rewrites.
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon.store.records import SUMMARY_COLUMNS

# Filter field -> the column it compares with `=`.
EQUAL_COLUMNS = {
    "function": "function",
    "status": "status",
    "trigger": "trigger",
    "version": "function_version",
    "id": "id",
}


class HistoryQuery(msgspec.Struct, frozen=True):
    """Which records a history page holds; every field left None matches all."""

    function: str | None = None
    status: str | None = None
    trigger: str | None = None
    version: str | None = None  # the version it ran (function_version)
    id: str | None = None
    since: float | None = None  # accepted (queued_at) at or after, Unix seconds
    until: float | None = None  # accepted before
    before: tuple[float, int] | None = None  # the cursor: (queued_at, seq) of the last row shown


def page_sql(query: HistoryQuery, limit: int) -> tuple[str, list[Any]]:
    """The SELECT of one page (`limit` rows, newest first) and its parameters.

    Each row also has `seq` (its rowid): a page's last (queued_at, seq) is the next one's
    `before`.
    """
    where: list[str] = []
    params: list[Any] = []
    for field, column in EQUAL_COLUMNS.items():
        value = getattr(query, field)
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if query.since is not None:
        where.append("queued_at >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("queued_at < ?")
        params.append(query.until)
    if query.before is not None:
        # The first term bounds the index range; the second only sorts out equal times.
        where.append("queued_at <= ? AND (queued_at < ? OR rowid < ?)")
        at, seq = query.before
        params += [at, at, seq]
    sql = f"SELECT {SUMMARY_COLUMNS}, rowid AS seq FROM invocations"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + " ORDER BY queued_at DESC, rowid DESC LIMIT ?", [*params, limit]
