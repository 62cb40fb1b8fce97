"""Crash safety, proven: the real daemon under load from all four sources, SIGKILLed 3 times.

The scenario lives in tests/chaos.py and its audit in tests/chaos_audit.py; benchmarks/chaos.py
runs a longer one with more kills.
"""

from __future__ import annotations

from tests.chaos import Chaos, run_chaos

NONE = {"mqtt": [], "webhook": [], "files": [], "cron": []}


async def test_chaos_sigkill_under_load_loses_nothing_and_records_nothing_twice(tmp_path):
    report = await run_chaos(Chaos(tmp_path, seconds=24, kills=3, seed=7))
    print(report.summary())
    assert len(report.kills) == 3
    assert all(count > 0 for count in report.events.values()), report.events
    assert report.settled_s is not None, f"not settled: {report.summary()}"
    assert report.lost == NONE, report.summary()
    assert report.duplicates == NONE, report.summary()
    assert report.not_final == []  # all succeeded, retried or not
    assert report.unrecorded_runs == []  # every handler run was a recorded attempt
    assert report.wrong_ids == [] and report.misplaced_files == []
    assert report.cron_lag_s < 5  # the cron kept firing up to the stop
    assert report.ok
