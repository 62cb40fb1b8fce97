"""Usage roll-ups: every attempt counted once, in its own transaction, whatever prunes or kills."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.config import DaemonSettings
from daemon.models import Outcome, Status, new_id
from daemon.store.batched import BatchItem
from daemon.store.migrations import MIGRATIONS
from daemon.store.retention import pruner_for
from daemon.store.sqlite import NewInvocation, Store
from tests.postgres import BACKENDS, open_store

REPO = Path(__file__).resolve().parents[2]
DAY = 86_400


def inv(id: str, at: float, function: str = "hello", kind: str = "sync") -> NewInvocation:
    return NewInvocation(
        id=id,
        function=function,
        function_version="$LATEST",
        trigger="api",
        invocation_type=kind,
        event=b"{}",
        queued_at=at,
        attempt=1,
    )


def out(status: Status, at: float, duration_ms: float | None = 10.2) -> Outcome:
    return Outcome(
        status=status,
        payload=b"1",
        started_at=at,
        ended_at=at,
        duration_ms=duration_ms if duration_ms is not None else 0.0,
        worker_pid=1,
    )


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path / "lambdaemon.db", request) as opened:
        yield opened


async def totals(store: Store) -> dict[str, object]:
    rows = await store.usage(0, "function")
    return {r["function"]: {k: r[k] for k in r.keys() if k != "function"} for r in rows}


async def test_usage_counts_each_attempt_once_with_billed_time_and_memory(store: Store) -> None:
    await store.save_memory_sizes({"hello": 512})
    now = time.time()
    # A sync call (10.2 ms bills 11), written again late as record_sync_final may be: once.
    a = inv(new_id(), now)
    await store.record_finished(a, out(Status.SUCCEEDED, now))
    await store.record_sync_final(a, out(Status.SUCCEEDED, now))
    # An async call that failed once and was retried: two attempts, one error; a repeated final
    # write (after an ambiguous commit) adds nothing.
    b = inv(new_id(), now, kind="async")
    await store.insert(b)
    await store.mark_running(b.id, 1, now, 1)
    await store.requeue(b.id, 1, out(Status.FAILED, now, 0.2), now + 1)
    await store.mark_running(b.id, 2, now, 1)
    await store.finish(b.id, 2, out(Status.SUCCEEDED, now, 3.0))
    await store.finish(b.id, 2, out(Status.SUCCEEDED, now, 3.0))
    assert await totals(store) == {
        "hello": {
            "requests": 3,
            "errors": 1,
            "duration_ms": pytest.approx(10.2 + 0.2 + 3.0),
            "billed_ms": 11 + 1 + 3,
            "mb_ms": 512 * (11 + 1 + 3),
        }
    }


async def test_usage_counts_a_batch_once_not_its_items(store: Store) -> None:
    now = time.time()
    items = [inv(new_id(), now, kind="async") for _ in range(3)]
    for item in items:
        await store.insert(item)
    batch_id = new_id()
    await store.mark_batch_running(batch_id, [(i.id, 1) for i in items], now)
    ran = out(Status.SUCCEEDED, now, 7.5)
    batch = inv(batch_id, now, kind="async")
    await store.settle_batch(
        batch, ran, [BatchItem(id=i.id, attempt=1, outcome=ran) for i in items], None
    )
    attempts = (await store.query("SELECT count(*) FROM attempts"))[0][0]
    assert attempts == 4  # the batch's and each item's
    usage = (await totals(store))["hello"]
    assert (usage["requests"], usage["billed_ms"]) == (1, 8)  # type: ignore[index]


async def test_usage_skips_inputs_that_never_ran_and_days_are_utc(store: Store) -> None:
    day = 20_000
    await store.insert_rejected(
        NewInvocation(
            id=new_id(),
            function="hello",
            function_version="$LATEST",
            trigger="mqtt",
            invocation_type="async",
            event=b"{}",
            queued_at=day * DAY,
            status=Status.FAILED,
        ),
        "Lambdaemon.BadEvent",
        "not JSON",
        b"{}",
    )
    await store.record_finished(inv(new_id(), day * DAY - 1), out(Status.FAILED, day * DAY - 1))
    await store.record_finished(inv(new_id(), day * DAY), out(Status.SUCCEEDED, day * DAY))
    rows = await store.usage(0, "day")
    assert [(r["day"], r["requests"], r["errors"]) for r in rows] == [
        (day, 1, 0),
        (day - 1, 1, 1),
    ]
    assert rows[0]["mb_ms"] == 128 * 11  # an unconfigured function counts at 128 MB


async def test_usage_survives_retention_pruning_the_records(store: Store) -> None:
    old = time.time() - 10 * DAY
    for n in range(20):
        await store.record_finished(inv(new_id(), old + n), out(Status.SUCCEEDED, old + n))
    before = await totals(store)
    report = await pruner_for(store, DaemonSettings(retention_days=1)).prune(time.time())
    assert report["by_age"] == 20
    assert (await store.query("SELECT count(*) FROM attempts"))[0][0] == 0
    assert await totals(store) == before
    assert before["hello"]["requests"] == 20  # type: ignore[index]


async def test_usage_migration_counts_what_older_records_hold(tmp_path: Path) -> None:
    db = tmp_path / "lambdaemon.db"
    conn = sqlite3.connect(db, isolation_level=None)
    with contextlib.closing(conn):
        for statements in MIGRATIONS[:5]:  # a store of the release before
            for sql in statements:
                conn.execute(sql)
        conn.execute("PRAGMA user_version = 5")
        for n, (status, ms) in enumerate([("succeeded", 10.2), ("failed", 0.4), ("crashed", None)]):
            conn.execute(
                "INSERT INTO invocations (id, function, function_version, trigger,"
                " invocation_type, status, queued_at, event) VALUES (?, 'old', '$LATEST', 'api',"
                " 'sync', ?, ?, x'7b7d')",
                (f"id{n}", status, DAY * 3.5),
            )
            conn.execute(
                "INSERT INTO attempts (invocation_id, attempt, status, started_at, ended_at,"
                " duration_ms) VALUES (?, 1, ?, ?, ?, ?)",
                (f"id{n}", status, DAY * 3.5, DAY * 3.5, ms),
            )
    async with Store.open(db) as store:
        rows = await store.usage(0, "day")
    assert [dict(r) for r in rows] == [
        {
            "day": 3,
            "requests": 3,
            "errors": 2,
            "duration_ms": pytest.approx(10.6),
            "billed_ms": 12,  # the crashed attempt has no duration: it bills nothing
            "mb_ms": 128 * 12,
        }
    ]


# Records finished sync invocations as fast as it can until it is killed.
PRODUCER = textwrap.dedent(
    """
    import asyncio, sys, time
    from daemon.models import Outcome, Status, new_id
    from daemon.store.sqlite import NewInvocation, Store

    async def main():
        async with Store.open(sys.argv[1]) as store:
            await store.save_memory_sizes({"hello": 256})
            n = 0
            while True:
                now = time.time()
                futures = []
                for _ in range(50):
                    n += 1
                    inv = NewInvocation(id=new_id(), function="hello",
                        function_version="$LATEST", trigger="api", invocation_type="sync",
                        event=b"{}", queued_at=now, attempt=1)
                    o = Outcome(status=Status.SUCCEEDED, payload=b"1", started_at=now,
                        ended_at=now, duration_ms=1.5, worker_pid=1)
                    futures.append(store.record_finished_nowait(inv, o))
                await asyncio.gather(*futures)
                print("committed", n, flush=True)

    asyncio.run(main())
    """
)


async def test_usage_is_exact_after_a_kill_9_mid_write(tmp_path: Path) -> None:
    db = tmp_path / "lambdaemon.db"
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
    try:
        async with asyncio.timeout(30):
            while not (await proc.stdout.readline()).startswith(b"committed 2000"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-stream: writes are queued and committing
        await proc.wait()
    # Twice: the second open must not count again what the first found.
    for _ in range(2):
        async with Store.open(db) as store:
            attempts = (await store.query("SELECT count(*) FROM attempts"))[0][0]
            usage = (await store.usage(0, "function"))[0]
    assert attempts >= 2000
    assert (usage["requests"], usage["billed_ms"], usage["mb_ms"]) == (
        attempts,
        2 * attempts,
        256 * 2 * attempts,
    )
