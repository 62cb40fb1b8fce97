"""The invocation store against real SQLite files: migrations, group commit, failures, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.errors import StoreUnavailableError
from daemon.models import Outcome, Status
from daemon.retry import Verdict
from daemon.store import batches, records, settle
from daemon.store import sqlite as store_module
from daemon.store.sqlite import MIGRATIONS, BatchItem, NewInvocation, QueuedInvocation, Store
from tests.postgres import BACKENDS, INTEGRITY_ERRORS, open_store
from tests.waits import until

REPO = Path(__file__).resolve().parents[2]
NORMAL, FULL = 1, 2  # PRAGMA synchronous
SQLITE_ONLY = pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # the file's own


def new(id: str, **fields: object) -> NewInvocation:
    defaults: dict[str, object] = {
        "function": "hello",
        "function_version": "1",
        "trigger": "mqtt",
        "invocation_type": "async",
        "event": b'{"n": 1}',
        "queued_at": 1000.0,
    }
    return NewInvocation(id=id, **{**defaults, **fields})  # type: ignore[arg-type]


def outcome(status: Status, **fields: object) -> Outcome:
    defaults: dict[str, object] = {
        "payload": b'"ok"',
        "started_at": 1001.0,
        "ended_at": 1001.5,
        "duration_ms": 500.2,
    }
    return Outcome(status=status, **{**defaults, **fields})  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "lambdaemon.db"


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, db: Path) -> AsyncIterator[Store]:
    """The store on each backend: SQLite at `db`, and PostgreSQL (tests/postgres.py)."""
    async with open_store(request.param, db, request) as opened:
        yield opened


def raw(db: Path, sql: str) -> list[tuple[object, ...]]:
    """Run `sql` on a plain sqlite3 connection of our own, outside the store."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        return conn.execute(sql).fetchall()


# --- migrations and lifecycle -----------------------------------------------------------------


async def test_store_migrates_an_empty_file(db: Path) -> None:
    with capture_logs() as logs:
        async with Store.open(db) as store:
            tables = {r["name"] for r in await store.query("SELECT name FROM sqlite_master")}
            mode = (await store.query("PRAGMA journal_mode"))[0][0]
    assert {"invocations", "attempts", "invocations_status_queued", "usage_daily"} <= tables
    assert mode == "wal"
    assert raw(db, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert [e["event"] for e in logs if e["event"] == "store_opened"] == ["store_opened"]


async def test_store_reopen_is_idempotent_and_keeps_rows(db: Path) -> None:
    async with Store.open(db) as store:
        await store.insert(new("a"))
    async with Store.open(db) as store:
        assert await store.status_of("a") == "queued"
    assert raw(db, "PRAGMA user_version") == [(len(MIGRATIONS),)]


async def test_store_refuses_a_newer_schema_without_leaking_threads(db: Path) -> None:
    async with Store.open(db):
        pass
    raw(db, "PRAGMA user_version = 99")
    threads = threading.active_count()
    with pytest.raises(StoreUnavailableError, match="schema version 99 is newer"):
        async with Store.open(db):
            pass
    assert threading.active_count() == threads


async def test_store_migration_step_is_all_or_nothing(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Store.open(db):
        pass
    broken = (("CREATE TABLE half_done (x)", "CREATE TABLE broken ("),)
    monkeypatch.setattr(batches, "MIGRATIONS", MIGRATIONS + broken)
    with pytest.raises(sqlite3.OperationalError):
        async with Store.open(db):
            pass
    assert raw(db, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert raw(db, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []


async def test_store_close_flushes_pending_writes_and_stops_threads(db: Path) -> None:
    threads = threading.active_count()
    async with Store.open(db) as store:
        await store.insert(new("a"))
        pending = store.mark_running("a", 1, 1001.0, 4242)  # not awaited before close
    assert pending.done() and pending.exception() is None
    assert raw(db, "SELECT status, worker_pid FROM invocations") == [("running", 4242)]
    assert threading.active_count() == threads
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.insert(new("b"))


async def test_store_cancelled_caller_still_gets_its_write_committed(store: Store) -> None:
    loop = asyncio.get_running_loop()
    in_db_thread = asyncio.Event()

    def insert_signalling(conn: sqlite3.Connection) -> tuple[str, bool]:
        loop.call_soon_threadsafe(in_db_thread.set)
        return records.insert(conn, new("a"))

    task = asyncio.create_task(store.transaction(insert_signalling))
    async with asyncio.timeout(5):
        await in_db_thread.wait()
    task.cancel()
    await store.barrier()
    assert task.cancelled()
    assert await store.status_of("a") == "queued"


# --- inserts and group commit -------------------------------------------------------------------


async def test_store_insert_dedupe_conflict_returns_the_existing_id(store: Store) -> None:
    assert await store.insert(new("first", dedupe_key="topic/1#42")) == ("first", True)
    assert await store.insert(new("second", dedupe_key="topic/1#42")) == ("first", False)
    assert await store.status_of("second") is None
    assert await store.insert(new("third")) == ("third", True)  # NULL keys never conflict
    assert await store.insert(new("fourth")) == ("fourth", True)


async def test_store_group_commit_batches_concurrent_inserts(store: Store) -> None:
    before = store.commits
    results = await asyncio.gather(*(store.insert(new(f"i{n}")) for n in range(500)))
    assert all(created for _, created in results)
    assert store.commits - before <= 5  # one transaction per batch, not per insert
    assert (await store.query("SELECT count(*) FROM invocations"))[0][0] == 500


async def test_store_failing_op_fails_only_its_own_future(store: Store) -> None:
    await store.insert(new("taken"))
    before, reruns = store.commits, store.reruns
    results = await asyncio.gather(
        store.insert(new("ok1")),
        store.insert(new("taken")),  # primary key conflict
        store.insert(new("bad", invocation_type="maybe")),  # CHECK constraint
        store.insert(new("ok2")),
        return_exceptions=True,
    )
    assert store.commits - before == 1
    # Tried whole without savepoints first; rolled back and run op by op once.
    assert store.reruns - reruns == 1
    assert results[0] == ("ok1", True) and results[3] == ("ok2", True)
    assert isinstance(results[1], INTEGRITY_ERRORS)
    assert isinstance(results[2], INTEGRITY_ERRORS)
    assert await store.status_of("bad") is None
    assert await store.status_of("ok2") == "queued"


async def test_store_batch_items_that_end_alike_and_those_that_do_not_are_each_recorded(
    store: Store,
) -> None:
    """settle_batch writes items that end alike together: every row still gets its own
    outcome, each attempts row names the batch, a retried item is queued again."""
    ids = [f"item-{i}" for i in range(70)]  # more than one multi-row chunk (64 + 4 + 2)
    for id in ids:
        await store.insert(new(id))
    await store.insert(new("again", attempt=1))
    await store.mark_batch_running("b1", [*((id, 1) for id in ids), ("again", 2)], 1001.0)
    assert {r[0] for r in await store.query("SELECT status FROM invocations")} == {"running"}
    ok = outcome(Status.SUCCEEDED, worker_pid=7)
    bad = outcome(Status.FAILED, worker_pid=7, error_type="Boom", error_message="no")
    items = [
        *(BatchItem(id, 1, ok) for id in ids[:60]),
        *(BatchItem(id, 1, bad, dead_letter="RetriesExhausted") for id in ids[60:]),
        BatchItem("again", 2, bad, next_attempt_at=2000.0),
    ]
    settled = await store.settle_batch(new("b1", attempt=1), ok, items, None)
    assert [s.status if s else None for s in settled] == [
        *["succeeded"] * 60,
        *["failed"] * 10,
        None,
    ]
    rows = {
        r["id"]: dict(r)
        for r in await store.query(
            "SELECT id, status, attempt, worker_pid, batch_id, dead_letter_reason, error_type"
            " FROM invocations"
        )
    }
    assert rows["b1"]["batch_id"] == "b1"
    assert {rows[id]["status"] for id in ids[:60]} == {"succeeded"}
    assert {(rows[id]["status"], rows[id]["dead_letter_reason"]) for id in ids[60:]} == {
        ("failed", "RetriesExhausted")
    }
    assert (rows["again"]["status"], rows["again"]["attempt"]) == ("queued", 2)
    assert {(rows[id]["worker_pid"], rows[id]["batch_id"]) for id in ids} == {(7, "b1")}
    attempts = await store.query(
        "SELECT invocation_id, attempt, status, error_type, worker_pid, batch_id FROM attempts"
        " WHERE invocation_id != 'b1' ORDER BY invocation_id"
    )
    expected = sorted(
        [
            *((id, 1, "succeeded", None, 7, "b1") for id in ids[:60]),
            *((id, 1, "failed", "Boom", 7, "b1") for id in ids[60:]),
            ("again", 2, "failed", "Boom", 7, "b1"),
        ]
    )
    assert [tuple(a) for a in attempts] == expected
    with pytest.raises(LookupError, match="not in the store"):
        await store.mark_batch_running("b2", [("nobody", 1), (ids[0], 2)], 1002.0)


async def test_store_batch_without_a_failure_commits_in_one_pass(store: Store) -> None:
    await store.insert(new("a"))
    await store.mark_running("a", 1, 1001.0, 5)
    before, reruns = store.commits, store.reruns
    done = outcome(Status.SUCCEEDED, worker_pid=5)
    await asyncio.gather(
        store.insert(new("b")),
        store.finish("a", 1, done),
        store.record_finished(new("c", invocation_type="sync"), done),
        store.requeue("b", 1, outcome(Status.FAILED), next_attempt_at=2000.0),
        store.barrier(),
    )
    assert store.commits - before == 1 and store.reruns == reruns
    rows = await store.query("SELECT id, status FROM invocations ORDER BY id")
    assert [tuple(r) for r in rows] == [("a", "succeeded"), ("b", "queued"), ("c", "succeeded")]


async def test_store_run_of_inserts_shares_statements_and_keeps_each_answer(store: Store) -> None:
    """Queued invocations inserted in one batch share multi-row statements, and each insert
    still answers as it would alone: created, or the id already stored under its key."""
    assert await store.insert(new("k0", dedupe_key="K0")) == ("k0", True)
    before, reruns = store.commits, store.reruns
    fresh = [store.insert(new(f"n{i:02}", dedupe_key=f"N{i}")) for i in range(70)]
    answers = await asyncio.gather(
        *fresh[:40],
        store.insert(new("again", dedupe_key="K0")),  # stored before
        store.insert(new("x1", dedupe_key="KX")),
        store.insert(new("x2", dedupe_key="KX")),  # taken by the row just before it
        store.insert(new("nokey")),
        *fresh[40:],
    )
    assert store.commits - before == 1 and store.reruns == reruns
    assert answers[40:44] == [("k0", False), ("x1", True), ("x1", False), ("nokey", True)]
    assert answers[:40] + answers[44:] == [(f"n{i:02}", True) for i in range(70)]
    count = await store.query("SELECT count(*) FROM invocations")
    assert count[0][0] == 1 + 70 + 2
    # A row that cannot go in (its id is taken) fails alone; the rest of the run commits.
    results = await asyncio.gather(
        store.insert(new("m1")),
        store.insert(new("n05")),
        store.insert(new("m2")),
        return_exceptions=True,
    )
    assert results[0] == ("m1", True) and results[2] == ("m2", True)
    assert isinstance(results[1], INTEGRITY_ERRORS)
    assert store.reruns == reruns + 1


async def test_store_runs_of_marks_and_finishes_share_statements_and_end_each_row(
    store: Store,
) -> None:
    """Async attempts' `running` marks and final records queued together are written a chunk
    of rows per statement (SQLite), and each row ends as its own write says."""
    ids = [f"r{i:02}" for i in range(70)]
    for id in ids:
        await store.insert(new(id))
    before, reruns = store.commits, store.reruns
    await asyncio.gather(
        *(store.mark_running(id, 1, 1001.0 + i, 100 + i) for i, id in enumerate(ids))
    )
    assert store.commits - before == 1 and store.reruns == reruns

    def ended(i: int) -> Outcome:
        if i % 4 == 0:
            return outcome(Status.FAILED, error_type="E", error_message=f"bad {i}", worker_pid=None)
        return outcome(Status.SUCCEEDED, payload=f'"ok {i}"'.encode(), worker_pid=100 + i)

    settled = await asyncio.gather(
        *(
            store.settle(
                id, 1, ended(i), None, dead_letter="RetriesExhausted" if i % 4 == 0 else None
            )
            for i, id in enumerate(ids)
        )
    )
    assert store.reruns == reruns
    assert [s.status for s in settled] == [str(ended(i).status) for i in range(70)]
    for i, id in enumerate(ids):
        record = await store.get(id)
        assert record is not None
        o = ended(i)
        assert (record["status"], record["result"], record["error_message"]) == (
            str(o.status),
            o.payload,
            o.error_message,
        ), id
        assert (record["worker_pid"], record["started_at"]) == (100 + i, o.started_at), id
        assert record["dead_letter_reason"] == ("RetriesExhausted" if i % 4 == 0 else None)
        assert [(a["attempt"], a["status"], a["worker_pid"]) for a in record["attempts"]] == [
            (1, str(o.status), 100 + i)
        ], id
    # A mark or a final record of an invocation that is not there fails alone.
    await store.insert(new("s1"))
    results = await asyncio.gather(
        store.mark_running("nobody", 1, 1.0, 1),
        store.mark_running("s1", 1, 1.0, 1),
        return_exceptions=True,
    )
    assert isinstance(results[0], LookupError) and results[1] is None
    assert store.reruns == reruns + 1
    assert await store.status_of("s1") == "running"


async def test_store_run_of_finished_sync_calls_is_recorded_as_one_by_one(store: Store) -> None:
    """A run of record_finished in a batch is written a chunk of rows per statement."""

    def finished(n: int) -> Outcome:
        if n % 3 == 0:
            return outcome(
                Status.FAILED,
                payload=b'{"errorType": "E"}',
                error_type="E",
                error_message=f"bad {n}",
                logs=f"log {n}\n",
                exit_code=None,
            )
        return outcome(
            Status.SUCCEEDED,
            payload=f'"ok {n}"'.encode(),
            duration_ms=float(n),
            worker_pid=None if n % 5 == 0 else 1000 + n,
        )

    before, reruns = store.commits, store.reruns
    # 100 around an insert: runs of 70 (64 + 4 + 2 rows a statement) and 30 (16 + 8 + 4 + 2).
    writes = [
        store.record_finished(
            new(f"s{n:03}", invocation_type="sync", attempt=1, event=f'{{"n": {n}}}'.encode()),
            finished(n),
        )
        for n in range(100)
    ]
    await asyncio.gather(*writes[:70], store.insert(new("q")), *writes[70:])
    assert store.commits - before == 1 and store.reruns == reruns
    for n in range(100):
        record = await store.get(f"s{n:03}")
        assert record is not None
        o = finished(n)
        assert (
            record["status"],
            record["error_message"],
            record["result"],
            record["logs"],
            record["duration_ms"],
            record["worker_pid"],
            record["event"],
        ) == (
            o.status,
            o.error_message,
            o.payload,
            o.logs,
            o.duration_ms,
            o.worker_pid,
            f'{{"n": {n}}}'.encode(),
        )
        assert [
            (a["attempt"], a["status"], a["worker_pid"], a["error_type"], a["logs"])
            for a in record["attempts"]
        ] == [(1, o.status, o.worker_pid, o.error_type, o.logs)]
    assert await store.status_of("q") == "queued"


async def test_store_failing_row_in_a_run_fails_alone(store: Store) -> None:
    await store.record_finished(new("taken", invocation_type="sync"), outcome(Status.SUCCEEDED))
    reruns = store.reruns
    results = await asyncio.gather(
        *(
            store.record_finished(new(i, invocation_type="sync"), outcome(Status.SUCCEEDED))
            for i in ("a", "b", "taken", "c")
        ),
        return_exceptions=True,
    )
    assert results[:2] == [None, None] and results[3] is None
    assert isinstance(results[2], INTEGRITY_ERRORS)
    assert store.reruns - reruns == 1
    rows = await store.query("SELECT invocation_id FROM attempts ORDER BY invocation_id")
    assert [r[0] for r in rows] == ["a", "b", "c", "taken"]


async def test_store_rerun_batch_runs_a_repeatable_callback_again_but_commits_it_once(
    store: Store,
) -> None:
    await store.transaction(lambda c: c.execute("CREATE TABLE marks (key TEXT PRIMARY KEY)"))
    await store.insert(new("taken"))
    calls = []

    def insert_and_mark(conn: sqlite3.Connection) -> tuple[str, bool]:
        calls.append(1)
        inserted = records.insert(conn, new("a"))
        conn.execute("INSERT INTO marks VALUES ('a')")
        return inserted

    reruns = store.reruns
    results = await asyncio.gather(
        store.transaction(insert_and_mark, repeatable=True),
        store.insert(new("taken")),
        return_exceptions=True,
    )
    assert results[0] == ("a", True) and isinstance(results[1], INTEGRITY_ERRORS)
    assert store.reruns - reruns == 1 and len(calls) == 2
    assert [tuple(r) for r in await store.query("SELECT key FROM marks")] == [("a",)]


async def test_store_unmarked_callback_runs_once_even_when_another_op_fails(
    store: Store,
) -> None:
    """A callback not marked repeatable puts its batch on one savepoint per op: no rerun."""
    await store.insert(new("taken"))
    seen: list[str] = []  # a Python effect that must not happen twice

    def remember(conn: sqlite3.Connection) -> str:
        seen.append("ran")
        return "value"

    def insert_remembering(conn: sqlite3.Connection) -> tuple[str, bool]:
        inserted = records.insert(conn, new("b"))
        seen.append("extra")
        return inserted

    before, reruns = store.commits, store.reruns
    results = await asyncio.gather(
        store.insert(new("a")),
        store.transaction(remember),
        store.transaction(insert_remembering),
        store.insert(new("taken")),
        store.insert(new("c")),
        return_exceptions=True,
    )
    assert results[0] == ("a", True) and results[1] == "value" and results[2] == ("b", True)
    assert isinstance(results[3], INTEGRITY_ERRORS) and results[4] == ("c", True)
    assert seen == ["ran", "extra"]
    assert store.commits - before == 1 and store.reruns == reruns


async def test_store_sets_synchronous_by_what_each_batch_holds(store: Store) -> None:
    """Bookkeeping alone commits with NORMAL; a batch with an accepting write with FULL.

    On PostgreSQL: synchronous_commit off for the one transaction, else on."""
    levels: list[int] = []

    def level(conn: sqlite3.Connection) -> None:
        if store.backend == "sqlite":
            levels.append(conn.execute("PRAGMA synchronous").fetchone()[0])
        else:  # synchronous_commit: off for a relaxed transaction, as NORMAL is on SQLite
            on = conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
            levels.append(FULL if on else NORMAL)

    def finish(id: str) -> Awaitable[object]:
        # Enqueued together, so in one batch: `level` sees what the finish's batch commits with.
        return asyncio.gather(store.finish(id, 1, done), store.transaction(level, relaxed=True))

    await asyncio.gather(*(store.insert(new(f"r{n}")) for n in range(4)))
    done = outcome(Status.SUCCEEDED)
    await finish("r0")  # relaxed alone: NORMAL
    await finish("r1")  # relaxed again: stays NORMAL
    await store.transaction(level)  # not relaxed: FULL again after relaxed batches
    await finish("r2")
    # One batch: relaxed bookkeeping beside an accepting insert commits with FULL.
    await asyncio.gather(finish("r3"), store.insert(new("x")))
    await store.record_finished(new("y", invocation_type="sync"), done)
    await store.transaction(level)
    assert levels == [NORMAL, NORMAL, FULL, NORMAL, FULL, FULL]


async def held(store: Store, *ids: str) -> list[asyncio.Future[tuple[str, bool]]]:
    """Enqueue bookkeeping (visible rows of sync calls); return once the writer has them."""
    writes = [store.insert_nowait(new(i, invocation_type="sync")) for i in ids]
    # Polled: the writer takes writes off its queue without telling anyone.
    await until(lambda: store.queued == 0, 5, "the writer to take the writes")
    return writes


async def test_store_bookkeeping_waits_to_grow_and_any_other_write_ends_the_wait(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "GROW_S", 60.0)  # only a write ends the wait here
    monkeypatch.setattr(store_module, "GROW_OPS", 4)
    async with asyncio.timeout(10):
        before = store.commits
        alone = store.record_finished_nowait(
            new("alone", invocation_type="sync"), outcome(Status.FAILED)
        )
        # Polled: the writer takes writes off its queue without telling anyone.
        await until(lambda: store.queued == 0, 5, "the writer to take the write")
        assert not alone.done()  # alone too: under load the next comes within microseconds
        await store.barrier()
        await alone
        assert store.commits - before == 1  # with the barrier that ended its wait

        writes = await held(store, "a", "b")
        assert not any(w.done() for w in writes)  # two queued together: they wait for more
        before = store.commits
        assert await store.insert(new("c")) == ("c", True)  # accepting: committed at once
        await asyncio.gather(*writes)
        assert store.commits - before == 1  # with the writes that were waiting

        for n, wake in enumerate((store.barrier, lambda: store.mark_running("c", 1, 1.0, 9))):
            writes = await held(store, f"{n}-1", f"{n}-2")
            before = store.commits
            await wake()  # a caller waits on both: on a barrier, and on a handler's start
            await asyncio.gather(*writes)
            assert store.commits - before == 1

        writes = await held(store, "d", "e")
        before = store.commits
        await asyncio.gather(*writes, *await held(store, "f", "g"))  # GROW_OPS reached
        assert store.commits - before == 1
    assert await store.status_of("g") == "queued"


async def test_store_waiting_batch_commits_after_grow_s_or_at_close(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with asyncio.timeout(10), Store.open(db) as store:
        monkeypatch.setattr(store_module, "GROW_S", 0.01)
        before = store.commits
        await asyncio.gather(*await held(store, "a", "b"))  # nothing more came
        assert store.commits - before == 1
        monkeypatch.setattr(store_module, "GROW_S", 60.0)
        writes = await held(store, "c", "d")  # closing ends their wait
    assert all(w.done() and w.exception() is None for w in writes)
    assert raw(db, "SELECT id FROM invocations ORDER BY id") == [("a",), ("b",), ("c",), ("d",)]


@SQLITE_ONLY
async def test_store_writer_keeps_temporary_files_in_memory(store: Store) -> None:
    assert await store.transaction(lambda c: c.execute("PRAGMA temp_store").fetchone()[0]) == 2


async def test_store_cron_fire_commits_with_the_row_or_not_at_all(store: Store) -> None:
    assert await store.insert(new("a", dedupe_key="cron@1"), cron_fire=("t#0", "1")) == (
        "a",
        True,
    )
    with pytest.raises(INTEGRITY_ERRORS):  # the mark cannot be written: nor is the row
        await store.insert(new("b", dedupe_key="cron@2"), cron_fire=("t#0", None))  # type: ignore[arg-type]
    # A duplicate does not mark: its fire's mark was committed with the original row.
    assert await store.insert(new("c", dedupe_key="cron@1"), cron_fire=("t#0", "3")) == (
        "a",
        False,
    )
    assert await store.last_cron_fire("t#0") == "1"
    assert await store.status_of("b") is None


async def test_store_transaction_returns_the_functions_value(store: Store) -> None:
    await store.insert(new("a"))
    count = await store.transaction(
        lambda c: c.execute("SELECT count(*) FROM invocations").fetchone()[0]
    )
    assert count == 1


# --- the lifecycle of a record ------------------------------------------------------------------


async def test_store_requeue_then_finish_keeps_each_attempt(store: Store) -> None:
    await store.insert(new("a"))
    store.mark_running("a", 1, 1001.0, 111)
    failed = outcome(
        Status.FAILED,
        payload=b'{"errorType": "ValueError"}',
        error_type="ValueError",
        error_message="bad input",
        logs="traceback...",
    )
    await store.requeue("a", 1, failed, next_attempt_at=1060.0)
    waiting = await store.get("a")
    assert waiting is not None
    assert waiting["status"] == "queued" and waiting["next_attempt_at"] == 1060.0
    assert waiting["error_type"] == "ValueError" and waiting["attempt"] == 1
    assert [q.id for q in await store.load_queued()] == ["a"]

    store.mark_running("a", 2, 1060.5, 222)
    done = outcome(
        Status.SUCCEEDED,
        started_at=1060.5,
        ended_at=1060.6,
        duration_ms=100.3,
        init_duration_ms=80.0,
        max_memory_mb=31.5,
        logs="hello\n",
        worker_pid=223,
    )
    await store.finish("a", 2, done)
    record = await store.get("a")
    assert record is not None
    assert record["status"] == "succeeded" and record["attempt"] == 2
    assert record["billed_duration_ms"] == 101 and record["init_duration_ms"] == 80.0
    assert record["result"] == b'"ok"' and record["event"] == b'{"n": 1}'
    assert record["logs"] == "hello\n" and record["worker_pid"] == 223
    assert record["next_attempt_at"] is None
    # The failed outcome had no pid: its attempt took mark_running's; the last brought its own.
    assert [(a["attempt"], a["status"], a["worker_pid"]) for a in record["attempts"]] == [
        (1, "failed", 111),
        (2, "succeeded", 223),
    ]
    assert record["attempts"][0]["error_message"] == "bad input"
    assert await store.load_queued() == []


async def test_store_finish_checks_status_and_id(store: Store) -> None:
    with pytest.raises(ValueError, match="final status"):
        await store.finish("a", 1, outcome(Status.RUNNING))
    with pytest.raises(LookupError, match="no invocation 'ghost'"):
        await store.finish("ghost", 1, outcome(Status.SUCCEEDED))


async def test_store_barrier_gives_read_your_writes(store: Store) -> None:
    await store.insert(new("a"))
    store.mark_running("a", 1, 1001.0, 7)  # enqueued, not awaited
    await store.barrier()
    assert await store.status_of("a") == "running"


def retry_twice(now: float):  # noqa: ANN201
    """A recovery policy like a function with retries = 2: retry at now + 5, then dead-letter."""

    def decide(function: str, attempt: int, retry_base: int, age_from: float) -> Verdict:
        if attempt - retry_base > 2:
            return Verdict(dead_letter="RetriesExhausted")
        return Verdict(next_attempt_at=now + 5)

    return decide


async def test_store_recover_never_dead_letters_on_a_mark_written_ahead_the_first_time(
    store: Store,
) -> None:
    """An attempt marked `running` ahead of its start (no worker yet) is recorded crashed, but
    the first time it is queued again even with no retries left; the next time the policy rules."""

    def no_retries(function: str, attempt: int, retry_base: int, age_from: float) -> Verdict:
        return Verdict(dead_letter="RetriesExhausted")

    await store.insert(new("ahead"))
    await store.insert(new("started"))
    store.mark_running("ahead", 1, 1001.0, records.MARKED_AHEAD)
    store.mark_running("started", 1, 1001.0, 11)
    first = await store.recover(2000.0, no_retries)
    assert first.requeued == ["ahead"]
    assert first.dead_lettered == [("started", "RetriesExhausted")]
    row = await store.get("ahead")
    assert row is not None
    assert (row["status"], row["attempt"], row["next_attempt_at"], row["recoveries"]) == (
        "queued",
        1,
        2000.0,
        1,
    )
    [attempt] = row["attempts"]  # every run that may have happened is a recorded attempt
    assert (attempt["status"], attempt["worker_pid"]) == ("crashed", None)
    assert attempt["error_message"] == settle.INTERRUPTED_AHEAD_MESSAGE

    store.mark_running("ahead", 2, 2001.0, records.MARKED_AHEAD)
    second = await store.recover(3000.0, no_retries)
    assert second.dead_lettered == [("ahead", "RetriesExhausted")]
    row = await store.get("ahead")
    assert row is not None and row["recoveries"] == 2
    assert [(a["attempt"], a["status"]) for a in row["attempts"]] == [
        (1, "crashed"),
        (2, "crashed"),
    ]


async def test_store_recover_follows_the_retry_policy_then_dead_letters(store: Store) -> None:
    await store.insert(new("async1"))
    await store.insert(new("sync1", invocation_type="sync", trigger="api"))
    store.mark_running("async1", 1, 1001.0, 11)
    store.mark_running("sync1", 1, 1001.0, 12)
    with capture_logs() as logs:
        first = await store.recover(2000.0, retry_twice(2000.0))
    assert (first.requeued, first.crashed, first.dead_lettered) == (["async1"], ["sync1"], [])
    assert {
        "event": "store_recovered",
        "requeued": 1,
        "crashed": 1,
        "dead_lettered": 0,
        "log_level": "info",
    } in logs
    row = await store.get("async1")
    assert row is not None
    assert (row["status"], row["recoveries"], row["next_attempt_at"]) == ("queued", 1, 2005.0)
    assert [(a["attempt"], a["status"]) for a in row["attempts"]] == [(1, "crashed")]
    [queued] = await store.load_queued()
    assert (queued.attempt, queued.next_attempt_at, queued.retry_base) == (1, 2005.0, 0)
    sync_row = await store.get("sync1")
    assert sync_row is not None  # the caller owns retries of a sync call: crashed for good
    assert (sync_row["status"], sync_row["ended_at"]) == ("crashed", 2000.0)
    assert sync_row["dead_letter_reason"] is None

    store.mark_running("async1", 2, 2006.0, 13)
    second = await store.recover(3000.0, retry_twice(3000.0))
    assert second.requeued == ["async1"]  # a second crash still has budget left
    store.mark_running("async1", 3, 3006.0, 14)
    third = await store.recover(4000.0, retry_twice(4000.0))
    assert (third.requeued, third.dead_lettered) == ([], [("async1", "RetriesExhausted")])
    row = await store.get("async1")
    assert row is not None
    assert (row["status"], row["dead_letter_reason"], row["dead_lettered_at"]) == (
        "crashed",
        "RetriesExhausted",
        4000.0,
    )
    assert row["recoveries"] == 3
    assert [(a["attempt"], a["status"]) for a in row["attempts"]] == [
        (1, "crashed"),
        (2, "crashed"),
        (3, "crashed"),
    ]
    assert (await store.recover(5000.0, retry_twice(5000.0))) == store_module.Recovery(
        requeued=[], crashed=[]
    )
    assert [r["id"] for r in await store.list_dead_letters()] == ["async1"]


async def test_store_dead_letter_keeps_status_and_redrive_restarts_the_budget(store: Store) -> None:
    await store.insert(new("a", queued_at=1000.0))
    await store.insert(new("b", function="gone", queued_at=1000.0))
    for id in ("a", "b"):
        store.mark_running(id, 1, 1001.0, 7)
        failed = outcome(Status.TIMED_OUT, error_type="Sandbox.Timedout", logs="first try\n")
        await store.finish(id, 1, failed, dead_letter="RetriesExhausted")
    record = await store.get("a")
    assert record is not None
    assert (record["status"], record["dead_letter_reason"]) == ("timed_out", "RetriesExhausted")
    assert record["dead_lettered_at"] is not None
    assert record["attempts"][0]["logs"] == "first try\n"  # each attempt keeps its own output

    # Only dead letters of configured functions come back, with a fresh budget and age.
    assert await store.redrive(["a", "b", "missing"], None, ["hello"]) == [
        QueuedInvocation(
            id="a",
            function="hello",
            invocation_type="async",
            trigger="mqtt",
            event=b'{"n": 1}',
            attempt=1,
            queued_at=1000.0,
            next_attempt_at=None,
            retry_base=1,
            age_from=pytest.approx(time.time(), abs=5),
            function_version="1",  # bound to it when accepted: its retries run the same code
        )
    ]
    record = await store.get("a")
    assert record is not None
    assert (record["status"], record["dead_letter_reason"]) == ("queued", None)
    assert record["redrives"] == 1
    assert await store.redrive(None, None, ["hello"]) == []  # nothing dead-lettered is left
    assert [r["id"] for r in await store.list_dead_letters()] == ["b"]


async def test_store_dead_letter_waiting_takes_the_last_attempts_status(store: Store) -> None:
    await store.insert(new("a"))
    store.mark_running("a", 1, 1001.0, 7)
    await store.requeue("a", 1, outcome(Status.CRASHED, signal=9), next_attempt_at=1002.0)
    assert (await store.dead_letter_waiting("a", "EventAgeExceeded")).status == "crashed"
    record = await store.get("a")
    assert record is not None
    assert (record["status"], record["dead_letter_reason"], record["ended_at"]) == (
        "crashed",
        "EventAgeExceeded",
        1001.5,
    )
    with pytest.raises(LookupError):  # only a queued row can be dead-lettered this way
        await store.dead_letter_waiting("a", "EventAgeExceeded")


async def test_store_upgrades_a_version_1_database_in_place(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(batches, "MIGRATIONS", MIGRATIONS[:1])
        async with Store.open(db):
            pass
    assert raw(db, "PRAGMA user_version") == [(1,)]
    # A retry waiting in a version-1 database, as the previous release wrote it.
    raw(
        db,
        "INSERT INTO invocations (id, function, function_version, trigger, invocation_type,"
        " status, attempt, queued_at, next_attempt_at, event)"
        " VALUES ('a', 'hello', '1', 'mqtt', 'async', 'queued', 1, 1000.0, 1060.0, '{}')",
    )
    raw(db, "INSERT INTO attempts (invocation_id, attempt, status) VALUES ('a', 1, 'failed')")
    async with Store.open(db) as store:
        [queued] = await store.load_queued()
        record = await store.get("a")
    assert (queued.attempt, queued.next_attempt_at, queued.retry_base, queued.age_from) == (
        1,
        1060.0,
        0,
        1000.0,
    )
    assert record is not None and record["dead_letter_reason"] is None
    assert record["attempts"][0]["logs"] is None
    assert raw(db, "PRAGMA user_version") == [(len(MIGRATIONS),)]


async def test_store_migrates_a_database_whose_cron_and_probe_tables_exist(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before version 4, cron and the health probe created their tables themselves."""
    with monkeypatch.context() as patch:
        patch.setattr(batches, "MIGRATIONS", MIGRATIONS[:3])
        async with Store.open(db):
            pass
    raw(db, "CREATE TABLE cron_fires (trigger_id TEXT PRIMARY KEY, last_nominal TEXT NOT NULL)")
    raw(db, "INSERT INTO cron_fires VALUES ('report#0', '2025-06-01T12:00:00Z')")
    raw(
        db,
        "CREATE TABLE store_probe"
        " (id INTEGER PRIMARY KEY CHECK (id = 1), written_at REAL NOT NULL)",
    )
    async with Store.open(db):
        pass
    assert raw(db, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert raw(db, "SELECT * FROM cron_fires") == [("report#0", "2025-06-01T12:00:00Z")]


async def test_store_migrations_create_every_table_the_daemon_uses(store: Store) -> None:
    if store.backend == "sqlite":
        rows = await store.query("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = await store.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            " AND table_name != 'lambdaemon_schema'"
        )
    assert {r[0] for r in rows} == {
        "invocations",
        "attempts",
        "outbox",
        "cron_fires",
        "store_probe",
        "deployed_code",
        "function_versions",
        "function_aliases",
        "version_counters",
        "deploy_history",
        "usage_daily",
        "usage_memory",
        "nodes",
    }


# --- queries ------------------------------------------------------------------------------------


async def test_store_load_queued_pages_in_queue_order(store: Store) -> None:
    for n, at in enumerate([5.0, 1.0, 3.0, 3.0, 2.0]):
        await store.insert(new(f"q{n}", queued_at=at))
    await store.mark_running("q4", 1, 10.0, None)
    first = await store.load_queued(limit=2)
    assert [q.id for q in first] == ["q1", "q2"]
    assert isinstance(first[0], QueuedInvocation) and first[0].event == b'{"n": 1}'
    rest = await store.load_queued(after=(first[-1].queued_at, first[-1].id))
    assert [q.id for q in rest] == ["q3", "q0"]


async def test_store_list_invocations_newest_first_without_payloads(store: Store) -> None:
    # Ids made later sort higher, as new_id()'s do.
    await store.insert(new("1-old", queued_at=1.0))
    await store.insert(new("2-new", queued_at=2.0))
    await store.insert(new("3-other", function="bye", queued_at=3.0))
    await store.mark_running("1-old", 1, 4.0, None)
    assert [r["id"] for r in await store.list_invocations()] == ["3-other", "2-new", "1-old"]
    hello = await store.list_invocations(function="hello", status="queued")
    assert [r["id"] for r in hello] == ["2-new"]
    assert not {"event", "result", "logs"} & hello[0].keys()
    assert await store.get("missing") is None


# --- failures of the disk, and of the process -----------------------------------------------------


@SQLITE_ONLY
async def test_store_full_disk_fails_the_batch_and_store_recovers(store: Store) -> None:
    await store.insert(new("before"))
    # SQLITE_FULL for real: the writer may not grow the file beyond its current size.
    await store.transaction(lambda c: c.execute("PRAGMA max_page_count = 1").fetchone())
    big = new("big", event=b"x" * 200_000)
    with capture_logs() as logs:
        results = await asyncio.gather(
            store.insert(new("small")), store.insert(big), return_exceptions=True
        )
    assert all(isinstance(r, StoreUnavailableError) for r in results)
    assert "full" in str(results[1])
    assert any(e["event"] == "store_write_failed" and "full" in e["reason"] for e in logs)
    assert store.write_failures == 1
    assert store.reruns == 0  # unavailable: the whole batch fails, not op by op

    await store.transaction(lambda c: c.execute("PRAGMA max_page_count = 1073741823").fetchone())
    assert await store.insert(big) == ("big", True)
    assert await store.status_of("small") is None


@SQLITE_ONLY
async def test_store_failed_commit_fails_every_future_of_the_batch(store: Store) -> None:
    def violate_at_commit(conn: sqlite3.Connection) -> None:
        # A deferred foreign key violation makes the COMMIT itself fail, as a real error would.
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute(
            "INSERT INTO attempts (invocation_id, attempt, status) VALUES ('x', 1, 'failed')"
        )

    results = await asyncio.gather(
        store.insert(new("a")), store.transaction(violate_at_commit), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailableError) for r in results)
    assert "FOREIGN KEY" in str(results[0])
    assert await store.status_of("a") is None
    assert await store.insert(new("a")) == ("a", True)


PRODUCER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from daemon.store.sqlite import NewInvocation, Store

    async def produce(store, n):
        for i in range(10**9):
            inv = NewInvocation(id=f"p{n}-{i}", function="f", function_version="1",
                                trigger="mqtt", invocation_type="async", event=b"{}",
                                queued_at=float(i), dedupe_key=f"k{n}-{i}")
            await store.insert(inv)
            print("committed", inv.id, flush=True)

    async def main():
        async with Store.open(Path(sys.argv[1])) as store:
            await asyncio.gather(*(produce(store, n) for n in range(8)))

    asyncio.run(main())
    """
)


async def test_store_keeps_every_acknowledged_insert_across_sigkill(db: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PRODUCER,
        str(db),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    acked: list[str] = []
    try:
        async with asyncio.timeout(30):
            while len(acked) < 400:
                line = (await proc.stdout.readline()).decode()
                assert line, "the producer exited early"
                if line.startswith("committed "):
                    acked.append(line.split()[1])
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    # Sent once only: Popen.send_signal polls first, and a second call could reap the child
    # under asyncio's watcher.
    proc.send_signal(signal.SIGKILL)
    # Lines already in the pipe were printed after their commit too.
    for line in (await proc.stdout.read()).decode().splitlines(keepends=True):
        if line.startswith("committed ") and line.endswith("\n"):
            acked.append(line.split()[1])
    assert await proc.wait() == -signal.SIGKILL

    async with Store.open(db) as store:
        stored = {r[0] for r in await store.query("SELECT id FROM invocations")}
    assert set(acked) <= stored
