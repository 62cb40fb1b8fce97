"""Worker recycling: after max_invocations_per_worker calls, or once a worker's RSS reaches
max_worker_rss_mb; always between invocations, never during one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_config
from daemon.errors import ConfigError
from daemon.models import Status
from daemon.pool import WorkerPool
from tests.pool.conftest import BASIC, LogWatch, alive, function, request


async def test_recycle_after_max_invocations_changes_pid_exactly_at_n_plus_1(
    pool: WorkerPool, logs: LogWatch
) -> None:
    fn = function("quota", max_invocations_per_worker=3)
    outcomes = [await pool.invoke(fn, request(fn)) for _ in range(7)]
    assert [outcome.status for outcome in outcomes] == [Status.SUCCEEDED] * 7
    pids = [outcome.worker_pid for outcome in outcomes]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
    # Each worker's module globals start over: the handler counts its own calls.
    assert [json.loads(outcome.payload)["calls"] for outcome in outcomes] == [1, 2, 3, 1, 2, 3, 1]
    assert [o.init_duration_ms is not None for o in outcomes] == [1, 0, 0, 1, 0, 0, 1]
    for pid in pids[0], pids[3]:
        stopped = await logs.wait_for("worker_stopped", pid=pid)
        assert (stopped["reason"], stopped["why"]) == ("recycled", "max_invocations")
        assert (stopped["invocations"], stopped["max_invocations_per_worker"]) == (3, 3)
        assert not alive(pid)  # type: ignore[arg-type]
    assert pool.stats() == {"quota": {"idle": 1, "busy": 0}}


async def test_recycle_above_rss_cap_after_the_call_that_crossed_it(
    pool: WorkerPool, logs: LogWatch
) -> None:
    # The interpreter alone is ~20 MB resident; each call keeps 20 MB more: ~40, ~60, ~80 MB.
    fn = function("leaky", "handler.leak", memory_mb=256, max_worker_rss_mb=72)
    leak = b'{"mb": 20}'
    first, second = [await pool.invoke(fn, request(fn, leak)) for _ in range(2)]
    assert first.worker_pid == second.worker_pid  # under the cap: kept warm
    third = await pool.invoke(fn, request(fn, leak))  # over it once this call is done
    assert third.status is Status.SUCCEEDED  # the call that crossed the cap is not cut short
    assert json.loads(third.payload)["kept_mb"] == 60 and third.worker_pid == first.worker_pid
    stopped = await logs.wait_for("worker_stopped", pid=first.worker_pid)
    assert (stopped["reason"], stopped["why"], stopped["invocations"]) == ("recycled", "rss", 3)
    assert stopped["rss_mb"] >= 72 and stopped["max_worker_rss_mb"] == 72
    fresh = await pool.invoke(fn, request(fn, leak))
    assert fresh.status is Status.SUCCEEDED and fresh.worker_pid != first.worker_pid
    assert json.loads(fresh.payload)["kept_mb"] == 20  # a new process, its memory given back


async def test_recycle_waits_for_the_running_invocation(make_pool: Any, logs: LogWatch) -> None:
    """With concurrency, a worker at its quota finishes its call; callers that queued meanwhile
    get a fresh worker, and none of them fails."""
    pool = await make_pool(max_workers=1)
    fn = function("busy", "handler.sleep", max_invocations_per_worker=1, concurrency=1)
    calls = [pool.invoke(fn, request(fn, b'{"s": 0.2}')) for _ in range(3)]
    outcomes = await asyncio.gather(*calls)
    assert [outcome.status for outcome in outcomes] == [Status.SUCCEEDED] * 3
    assert len({outcome.worker_pid for outcome in outcomes}) == 3
    recycled = logs.find("worker_stopped", reason="recycled")
    assert len(recycled) >= 2 and all(entry["why"] == "max_invocations" for entry in recycled)


async def test_recycle_refills_min_warm(make_pool: Any, logs: LogWatch) -> None:
    fn = function("kept", min_warm=1, max_invocations_per_worker=1)
    pool = await make_pool(functions={"kept": fn})
    outcome = await pool.invoke(fn, request(fn))
    assert outcome.init_duration_ms is None  # the warm worker served it
    mark = logs.mark()
    await logs.wait_for("worker_stopped", pid=outcome.worker_pid, reason="recycled")
    started = await logs.wait_for("worker_started", function="kept", since=mark)
    assert started["pid"] != outcome.worker_pid
    assert pool.stats() == {"kept": {"idle": 1, "busy": 0}}


def test_recycle_rss_cap_above_memory_mb_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "lambdaemon.toml"
    path.write_text(
        f'[functions.f]\nhandler = "handler.count"\ncode = "{BASIC}"\n'
        "memory_mb = 128\nmax_worker_rss_mb = 200\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "functions.f.max_worker_rss_mb"
    assert "memory_mb = 128" in caught.value.reason
