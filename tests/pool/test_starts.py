"""Worker starts that fail for want of descriptors: the slot comes back, the call fails at once,
the pool says it is degraded and recovers by itself. Real worker processes, real EMFILE."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from daemon.models import Status
from daemon.pool import WorkerPool
from daemon.pool.process import _PidfdChildWatcher
from tests.pool.conftest import descriptors_exhausted, function, request
from tests.waits import LogWatch

START_FAILED = "Lambdaemon.WorkerStartFailed"


async def invoke(pool: WorkerPool, name: str) -> Any:
    fn = function(name)
    # Bounded: a slot lost by a failed start makes the next call wait for it forever.
    async with asyncio.timeout(10):
        return await pool.invoke(fn, request(fn))


async def test_pool_gives_the_slot_back_when_a_start_runs_out_of_descriptors(
    make_pool: Any, logs: LogWatch
) -> None:
    pool = await make_pool(max_workers=1)
    with descriptors_exhausted():
        # One slot in all: each call after a lost slot would wait forever.
        outcomes = [await invoke(pool, "count") for _ in range(3)]
        assert pool.start_health.degraded
    for outcome in outcomes:
        assert outcome.status is Status.FAILED and outcome.error_type == START_FAILED
        assert outcome.error_message.endswith("[Errno 24] Too many open files")
        assert json.loads(outcome.payload)["errorType"] == START_FAILED
    assert pool.stats() == {}
    assert len(logs.find("worker_start_failed", function="count")) == 3
    assert len(logs.find("pool_degraded")) == 1  # loud once, not once per call
    report = pool.start_health.report()
    assert report["status"] == "degraded" and report["reason"] == "workers_cannot_start"
    assert report["failed_starts"] == 3 and "Too many open files" in report["error"]

    outcome = await invoke(pool, "count")
    assert outcome.status is Status.SUCCEEDED, outcome.payload
    assert not pool.start_health.degraded and pool.start_health.report()["status"] == "ok"
    await logs.wait_for("pool_restored")
    assert pool.stats() == {"count": {"idle": 1, "busy": 0}}


async def test_pool_recovers_by_itself_once_descriptors_are_back(
    make_pool: Any, logs: LogWatch
) -> None:
    pool = await make_pool(max_workers=2)
    with descriptors_exhausted():
        outcome = await invoke(pool, "count")
    assert outcome.error_type == START_FAILED and pool.start_health.degraded
    # No call comes: the pool's own retry starts a worker, which then idles.
    restored = await logs.wait_for("pool_restored", timeout_s=10)
    assert restored["failures"] == 1
    await logs.wait_for("worker_started", function="count")
    assert not pool.start_health.degraded


async def test_pool_keeps_serving_waiters_when_a_start_fails(make_pool: Any) -> None:
    # Calls queued behind a failing start each get the failure, none waits on a lost slot.
    pool = await make_pool(max_workers=1)
    with descriptors_exhausted():
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*(invoke(pool, f"fn{i % 2}") for i in range(6)))
    assert {outcome.error_type for outcome in outcomes} == {START_FAILED}
    assert (await invoke(pool, "fn0")).status is Status.SUCCEEDED


async def test_pool_gives_the_slot_back_when_a_worker_dies_during_init(
    make_pool: Any, tmp_path: Path
) -> None:
    (tmp_path / "handler.py").write_text("import os\nos._exit(3)\n")
    fn = function("dies", "handler.handler", code=tmp_path)
    pool = await make_pool(max_workers=1)
    for _ in range(2):  # one slot: a lost one makes the second call wait forever
        async with asyncio.timeout(10):
            outcome = await pool.invoke(fn, request(fn))
        assert outcome.status is Status.CRASHED and outcome.error_type == "Runtime.ExitError"
        assert outcome.exit_code == 3
    assert not pool.start_health.degraded  # the process started: the function is at fault
    assert (await invoke(pool, "count")).status is Status.SUCCEEDED


def test_pidfd_watcher_ends_a_child_it_cannot_watch() -> None:
    # A child whose pidfd cannot be opened (EMFILE) would live on unreaped, its exit unheard.
    child = subprocess.Popen(["sleep", "60"])
    exits: list[tuple[int, int]] = []
    loop = asyncio.new_event_loop()
    try:
        with descriptors_exhausted():
            loop.run_until_complete(_watch(child.pid, exits))
        loop.run_until_complete(asyncio.sleep(0))  # the callback is scheduled, not called inline
    finally:
        loop.close()
    assert exits == [(child.pid, -signal.SIGKILL)]
    assert not os.path.exists(f"/proc/{child.pid}")  # reaped, not a zombie
    child.returncode = -signal.SIGKILL  # Popen must not wait for it again


async def _watch(pid: int, exits: list[tuple[int, int]]) -> None:
    _PidfdChildWatcher().add_child_handler(pid, lambda *exit: exits.append(exit))
