"""Versions of one function side by side in the pool: `$LATEST` and published versions each keep
their own warm workers, and each call runs its own version's code."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.config import FunctionConfig
from daemon.models import Outcome, Status
from daemon.pool import WorkerPool
from tests.pool.conftest import alive, function, request
from tests.waits import LogWatch

HANDLER = """\
import os
import time

MARKER = {marker!r}


def handler(event, context):
    time.sleep(event.get("s", 0))
    return {{
        "marker": MARKER,
        "pid": os.getpid(),
        "context_version": context.function_version,
        "env_version": os.environ["AWS_LAMBDA_FUNCTION_VERSION"],
    }}
"""


def version(tmp_path: Path, number: str, marker: str, **settings: Any) -> FunctionConfig:
    """Version `number` of the function "fn", its code in a folder of its own saying `marker`."""
    code = tmp_path / marker
    code.mkdir()
    (code / "handler.py").write_text(HANDLER.format(marker=marker))
    return function("fn", "handler.handler", code, version=number, **settings)


async def call(pool: WorkerPool, fn: FunctionConfig, event: bytes = b"{}") -> dict[str, Any]:
    outcome = await pool.invoke(fn, request(fn, event))
    assert outcome.status is Status.SUCCEEDED, outcome.payload
    result: dict[str, Any] = json.loads(outcome.payload)
    result["cold"] = outcome.init_duration_ms is not None
    return result


def idle(count: int) -> dict[str, int]:
    return {"idle": count, "busy": 0}


async def test_pool_versions_of_one_function_stay_warm_side_by_side(
    pool: WorkerPool, tmp_path: Path, logs: LogWatch
) -> None:
    versions = [
        version(tmp_path, "$LATEST", "latest"),
        version(tmp_path, "1", "one"),
        version(tmp_path, "2", "two"),
    ]
    rounds = [[await call(pool, fn) for fn in versions] for _ in range(3)]
    for results in rounds:
        assert [result["marker"] for result in results] == ["latest", "one", "two"]
        assert [result["context_version"] for result in results] == ["$LATEST", "1", "2"]
        assert [result["env_version"] for result in results] == ["$LATEST", "1", "2"]
    assert [[result["cold"] for result in results] for results in rounds] == [
        [True, True, True],
        [False, False, False],
        [False, False, False],
    ]
    pids = [result["pid"] for result in rounds[0]]
    assert len(set(pids)) == 3
    assert all([result["pid"] for result in results] == pids for results in rounds)
    started = [(entry["version"], entry["pid"]) for entry in logs.find("worker_started")]
    assert started == list(zip(["$LATEST", "1", "2"], pids, strict=True))
    assert not logs.find("worker_stopped")
    assert pool.stats() == {"fn": idle(3)}
    assert pool.stats_by_version() == {"fn": {"$LATEST": idle(1), "1": idle(1), "2": idle(1)}}


async def test_pool_changed_latest_retires_only_latest_workers(
    make_pool: Any, tmp_path: Path, logs: LogWatch
) -> None:
    latest, one = version(tmp_path, "$LATEST", "latest"), version(tmp_path, "1", "one")
    pool = await make_pool(functions={"fn": latest})
    before = [await call(pool, fn) for fn in (latest, one)]
    deployed = version(tmp_path, "$LATEST", "deployed")
    await pool.update({"fn": deployed})
    await logs.wait_for("worker_stopped", pid=before[0]["pid"], reason="retired", version="$LATEST")
    after = [await call(pool, fn) for fn in (deployed, one)]
    assert [result["marker"] for result in after] == ["deployed", "one"]
    assert after[0]["cold"] and after[0]["pid"] != before[0]["pid"]
    assert not after[1]["cold"] and after[1]["pid"] == before[1]["pid"]
    assert [entry["pid"] for entry in logs.find("worker_stopped")] == [before[0]["pid"]]


async def test_pool_latest_changed_mid_call_finishes_on_the_old_code(
    pool: WorkerPool, tmp_path: Path, logs: LogWatch
) -> None:
    latest, one = version(tmp_path, "$LATEST", "latest"), version(tmp_path, "1", "one")
    warm_one = await call(pool, one)
    slow = asyncio.create_task(call(pool, latest, b'{"s": 0.5}'))
    await logs.wait_for("worker_started", version="$LATEST")
    deployed = version(tmp_path, "$LATEST", "deployed")
    fresh = await call(pool, deployed)  # a second $LATEST worker, on the new code
    old = await slow
    assert (old["marker"], fresh["marker"]) == ("latest", "deployed")
    await logs.wait_for("worker_stopped", pid=old["pid"], reason="retired")
    assert (await call(pool, one))["pid"] == warm_one["pid"]
    assert (await call(pool, deployed))["pid"] == fresh["pid"]


async def test_pool_update_keeps_version_workers_until_the_function_is_removed(
    make_pool: Any, tmp_path: Path, logs: LogWatch
) -> None:
    latest, one = version(tmp_path, "$LATEST", "latest"), version(tmp_path, "1", "one")
    pool = await make_pool(functions={"fn": latest})
    before = [await call(pool, fn) for fn in (latest, one)]
    reloaded = function("fn", "handler.handler", Path(latest.code or ""))  # equal, a new object
    await pool.update({"fn": reloaded, "other": function("other")})
    after = [await call(pool, fn) for fn in (reloaded, one)]
    assert [result["pid"] for result in after] == [result["pid"] for result in before]
    assert not any(result["cold"] for result in after)
    await pool.update({"other": function("other")})
    for result in before:
        await logs.wait_for("worker_stopped", pid=result["pid"], reason="retired")
    assert pool.stats() == {"other": idle(0)}
    assert pool.stats_by_version() == {"other": {}}


async def test_pool_retire_stops_a_version_idle_now_and_busy_after_its_call(
    pool: WorkerPool, tmp_path: Path, logs: LogWatch
) -> None:
    latest, one, two = (
        version(tmp_path, "$LATEST", "latest"),
        version(tmp_path, "1", "one"),
        version(tmp_path, "2", "two"),
    )
    kept, idle_one = await call(pool, latest), await call(pool, one)
    running: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    busy_two = asyncio.create_task(
        pool.invoke(two, request(two, b'{"s": 0.5}'), lambda pid, _: running.set_result(pid))
    )
    async with asyncio.timeout(10):
        busy_pid = await running
    pool.retire("fn", "1")
    pool.retire("fn", "2")
    pool.retire("fn", "7")  # never ran: nothing to do
    await logs.wait_for("worker_stopped", pid=idle_one["pid"], reason="retired")
    assert alive(busy_pid) and not logs.find("worker_stopped", pid=busy_pid)
    outcome: Outcome = await busy_two
    assert outcome.status is Status.SUCCEEDED and json.loads(outcome.payload)["marker"] == "two"
    await logs.wait_for("worker_stopped", pid=busy_pid, reason="retired")
    assert pool.stats_by_version() == {"fn": {"$LATEST": idle(1)}}
    assert (await call(pool, latest))["pid"] == kept["pid"]
    again = await call(pool, one)  # a call that still comes for it starts afresh
    assert again["cold"] and again["marker"] == "one" and again["pid"] != idle_one["pid"]
    with pytest.raises(ValueError, match=r"function 'fn': \$LATEST cannot be retired"):
        pool.retire("fn", "$LATEST")


async def test_pool_keeps_min_warm_for_latest_only(
    make_pool: Any, tmp_path: Path, logs: LogWatch
) -> None:
    settings: dict[str, Any] = {"min_warm": 1, "idle_timeout_s": 0.2}
    latest = version(tmp_path, "$LATEST", "latest", **settings)
    one = version(tmp_path, "1", "one", **settings)  # a snapshot of $LATEST's settings
    pool = await make_pool(functions={"fn": latest})
    result = await call(pool, one)
    await logs.wait_for("worker_stopped", pid=result["pid"], reason="idle", version="1")
    assert pool.stats_by_version() == {"fn": {"$LATEST": idle(1)}}


async def test_pool_evicts_and_queues_across_versions_at_the_cap(
    make_pool: Any, tmp_path: Path, logs: LogWatch
) -> None:
    pool = await make_pool(max_workers=2)
    latest, one, two = (
        version(tmp_path, "$LATEST", "latest"),
        version(tmp_path, "1", "one"),
        version(tmp_path, "2", "two"),
    )
    oldest = await call(pool, one)
    await call(pool, two)
    await call(pool, latest)
    await logs.wait_for("worker_stopped", pid=oldest["pid"], reason="evicted")
    assert pool.stats_by_version() == {"fn": {"$LATEST": idle(1), "2": idle(1)}}

    pool = await make_pool(max_workers=1)
    order: list[str] = []
    running = asyncio.Event()

    def starting(label: str) -> Any:
        def on_start(pid: int, started_at: float) -> None:
            order.append(label)
            running.set()

        return on_start

    def invoke(fn: FunctionConfig, event: bytes, label: str) -> asyncio.Task[Outcome]:
        return asyncio.create_task(pool.invoke(fn, request(fn, event), starting(label)))

    first = invoke(one, b'{"s": 0.3}', "first")
    async with asyncio.timeout(10):
        await running.wait()
    second, third = invoke(two, b"{}", "second"), invoke(one, b"{}", "third")
    outcomes = await asyncio.gather(first, second, third)
    assert order == ["first", "second", "third"]
    markers = [json.loads(outcome.payload)["marker"] for outcome in outcomes]
    assert markers == ["one", "two", "one"]
    assert len({outcome.worker_pid for outcome in outcomes}) == 3  # one process at a time
