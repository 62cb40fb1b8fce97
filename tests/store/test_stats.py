"""The dashboard's window figures (GET /v1/stats) from a real store: buckets, errors,
percentiles, triggers and the last record, against records whose figures are known."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.models import Outcome, Status, new_id
from daemon.store.sqlite import NewInvocation, Store
from tests.postgres import BACKENDS, open_store

START = 1_780_000_000.0  # the window: START to START + 600 s, in 10 buckets of a minute


def record(
    function: str, at: float, duration_ms: float, status: Status, trigger_id: str | None
) -> tuple[NewInvocation, Outcome]:
    inv = NewInvocation(
        id=new_id(),
        function=function,
        function_version="$LATEST",
        trigger="cron" if trigger_id else "api",
        trigger_id=trigger_id,
        invocation_type="async",
        event=b"{}",
        queued_at=at,
        attempt=1,
    )
    out = Outcome(status=status, payload=b"1", started_at=at, ended_at=at, duration_ms=duration_ms)
    return inv, out


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path / "lambdaemon.db", request) as opened:
        # alpha: 100 calls in minute 0 to 4, durations 1..100 ms; every tenth failed (cron#0)
        for n in range(100):
            status = Status.FAILED if n % 10 == 9 else Status.SUCCEEDED
            trigger = "alpha#0" if n % 10 == 9 else None
            opened.record_finished_nowait(
                *record("alpha", START + n * 3, float(n + 1), status, trigger)
            )
        # before the window and after it: counted nowhere, but the later one is alpha's last
        opened.record_finished_nowait(*record("alpha", START - 1, 5000.0, Status.CRASHED, None))
        late = record("alpha", START + 600, 7.0, Status.SUCCEEDED, None)
        opened.record_finished_nowait(*late)
        # beta: one timed-out call, its cron trigger's latest event
        opened.record_finished_nowait(
            *record("beta", START + 590, 30.0, Status.TIMED_OUT, "beta#0")
        )
        await opened.barrier()
        opened.late_id = late[0].id  # type: ignore[attr-defined]
        yield opened


async def test_window_stats_counts_buckets_errors_and_percentiles(store: Store) -> None:
    got = await store.window_stats(["alpha", "beta", "idle"], START, START + 600, 10)
    alpha = got["alpha"]
    assert alpha["invocations"] == 100 and alpha["errors"] == 10
    assert alpha["series"]["invocations"] == [20, 20, 20, 20, 20, 0, 0, 0, 0, 0]
    assert alpha["series"]["errors"] == [2, 2, 2, 2, 2, 0, 0, 0, 0, 0]
    assert alpha["series"]["duration_max_ms"][:6] == [20.0, 40.0, 60.0, 80.0, 100.0, None]
    assert alpha["series"]["duration_mean_ms"][0] == pytest.approx(10.5)
    assert alpha["duration_mean_ms"] == pytest.approx(50.5)
    assert alpha["p50_ms"] == 51.0  # the 50th of 1..100 (index round(99 * 0.5))
    assert alpha["p95_ms"] == 95.0
    assert alpha["last"]["id"] == store.late_id  # type: ignore[attr-defined]
    assert alpha["triggers"]["api"]["invocations"] == 90
    assert alpha["triggers"]["api"]["failing"] is False
    cron = alpha["triggers"]["alpha#0"]
    assert (cron["invocations"], cron["errors"], cron["failing"]) == (10, 10, True)
    beta = got["beta"]
    assert beta["series"]["errors"][9] == 1 and beta["p95_ms"] == 30.0
    assert beta["triggers"]["beta#0"]["failing"] is True
    idle = got["idle"]
    assert idle["invocations"] == 0 and idle["p50_ms"] is None and idle["last"] is None
    assert idle["series"]["invocations"] == [0] * 10


async def test_window_stats_percentiles_use_the_latest_sample(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.store import stats

    monkeypatch.setattr(stats, "PERCENTILE_SAMPLE", 10)  # the last ten: durations 91..100
    got = await store.window_stats(["alpha"], START, START + 600, 10)
    assert got["alpha"]["p50_ms"] == 95.0 and got["alpha"]["p95_ms"] == 100.0
