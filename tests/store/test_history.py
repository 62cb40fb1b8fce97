"""History pages from the store: keyset paging, filters, and the indexes they use."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from daemon.models import Outcome, Status
from daemon.store.history import HistoryQuery, page_sql
from daemon.store.sqlite import NewInvocation, Store
from tests.postgres import BACKENDS, open_store

T0_MS = 1_780_000_000_000  # the records' acceptance times start here, one second apart


def uuid7(ms: int, n: int) -> str:
    h = f"{ms:012x}{n:020x}"
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def accepted(n: int) -> float:
    return T0_MS / 1000 + n - (n % 3 == 2)


def record(n: int) -> tuple[NewInvocation, Outcome]:
    """The n-th record: two functions, statuses, triggers and versions by turns; every third
    shares its acceptance time with the one before (ties are broken by the order written)."""
    at = accepted(n)
    inv = NewInvocation(
        id=uuid7(T0_MS + n * 1000, n),
        function=("alpha", "beta")[n % 2],
        function_version=("$LATEST", "1", "2")[n % 3],
        trigger=("api", "cron", "mqtt", "webhook")[n % 4],
        invocation_type="sync",
        event=b"{}",
        queued_at=at,
        attempt=1,
    )
    status = Status.FAILED if n % 5 == 0 else Status.SUCCEEDED
    out = Outcome(status=status, payload=b"1", started_at=at, ended_at=at, duration_ms=1.0)
    return inv, out


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path / "lambdaemon.db", request) as opened:
        for n in range(300):
            opened.record_finished_nowait(*record(n))
        await opened.barrier()
        yield opened


async def pages(store: Store, query: HistoryQuery, limit: int) -> list[list[str]]:
    out, before = [], None
    while True:
        rows = await store.history(msgspec_replace(query, before), limit)
        if not rows:
            return out
        out.append([r["id"] for r in rows])
        before = (rows[-1]["queued_at"], rows[-1]["seq"])


def msgspec_replace(query: HistoryQuery, before: tuple[float, int] | None) -> HistoryQuery:
    return msgspec.structs.replace(query, before=before)


async def test_history_pages_cover_every_record_once_newest_first(store: Store) -> None:
    got = await pages(store, HistoryQuery(), 64)
    flat = [i for page in got for i in page]
    assert [len(p) for p in got] == [64, 64, 64, 64, 44]
    assert flat == [record(n)[0].id for n in reversed(range(300))]


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        (HistoryQuery(function="beta"), lambda n: n % 2 == 1),
        (HistoryQuery(status="failed"), lambda n: n % 5 == 0),
        (HistoryQuery(trigger="cron"), lambda n: n % 4 == 1),
        (HistoryQuery(version="2"), lambda n: n % 3 == 2),
        (HistoryQuery(function="alpha", status="failed"), lambda n: n % 10 == 0),
        (HistoryQuery(id=uuid7(T0_MS + 7000, 7)), lambda n: n == 7),
        # since is inclusive, until exclusive
        (HistoryQuery(since=accepted(251)), lambda n: accepted(n) >= accepted(251)),
        (HistoryQuery(until=accepted(21)), lambda n: accepted(n) < accepted(21)),
        (
            HistoryQuery(function="alpha", since=accepted(100), until=accepted(140) + 0.5),
            lambda n: n % 2 == 0 and accepted(100) <= accepted(n) <= accepted(140),
        ),
    ],
)
async def test_history_filters_select_exactly_their_records(store, query, matches) -> None:
    got = [i for page in await pages(store, query, 7) for i in page]
    assert got == [record(n)[0].id for n in reversed(range(300)) if matches(n)]


FILTERS = {
    "function": "alpha",
    "status": "failed",
    "trigger": "cron",
    "version": "1",
    "since": T0_MS / 1000,
    "until": T0_MS / 1000 + 10,
    "before": (T0_MS / 1000 + 5, 6),
}


def combinations() -> list[dict[str, object]]:
    fields = list(FILTERS)
    out: list[dict[str, object]] = []
    for k in range(len(fields) + 1):
        for chosen in itertools.combinations(fields, k):
            out.append({f: FILTERS[f] for f in chosen})
    return out


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # SQLite's planner
@pytest.mark.parametrize("fields", combinations(), ids=lambda f: "+".join(f) or "none")
async def test_history_every_filter_combination_walks_an_index(store: Store, fields) -> None:
    sql, params = page_sql(HistoryQuery(**fields), 50)  # type: ignore[arg-type]
    plan = [row[3] for row in await store.query("EXPLAIN QUERY PLAN " + sql, params)]
    text = " | ".join(plan)
    # No sort of the matches (a page would cost every match), no scan of the table itself.
    assert "TEMP B-TREE" not in text, text
    assert all("USING" in step for step in plan if step.startswith(("SCAN", "SEARCH"))), text
    if fields:  # a filter is a SEARCH: an index range, not a walk over every entry
        assert any(step.startswith("SEARCH invocations USING") for step in plan), text


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
async def test_history_plans_hold_on_a_file_that_sqlite_analyzed(store: Store, tmp_path) -> None:
    # PRAGMA optimize (or a user's ANALYZE) gives the planner statistics; the plans must not
    # turn into scans or sorts with them either.
    with sqlite3.connect(tmp_path / "lambdaemon.db") as conn:
        conn.execute("ANALYZE")
    for fields in combinations():
        sql, params = page_sql(HistoryQuery(**fields), 50)  # type: ignore[arg-type]
        plan = " | ".join(r[3] for r in await store.query("EXPLAIN QUERY PLAN " + sql, params))
        assert "TEMP B-TREE" not in plan, (fields, plan)
