"""The cron source inside the real daemon: catch-up after downtime and SIGKILL restarts.

A per-minute schedule cannot be waited for in a test, so the test moves the stored fire marker
back while the daemon is down: the restart then has five missed fires to catch up at once.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.daemon_proc import Daemon, write_config

FUNCS = Path(__file__).resolve().parents[1] / "functions"
BODY = f"""
[functions.echo]
handler = "handler.handler"
code = "{FUNCS / "echo"}"

[[functions.echo.triggers]]
type = "cron"
schedule = "* * * * *"
missed = "run_all"
grace_s = 3600
"""


def set_marker(db: Path, nominal: datetime) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            changed = conn.execute(
                "UPDATE cron_fires SET last_nominal = ? WHERE trigger_id = 'echo#0'",
                (nominal.strftime("%Y-%m-%dT%H:%M:%SZ"),),
            ).rowcount
        assert changed == 1
    finally:
        conn.close()


async def cron_runs(daemon: Daemon) -> list[dict]:
    rows = await daemon.invocations(function="echo")
    return sorted((r for r in rows if r["trigger"] == "cron"), key=lambda r: r["dedupe_key"])


def minutes(since: datetime, until: datetime) -> list[str]:
    """The per-minute nominal times in [since, until], as dedupe keys."""
    out, t = [], since
    while t <= until:
        out.append(f"cron:echo#0@{t.strftime('%Y-%m-%dT%H:%M:%SZ')}")
        t += timedelta(minutes=1)
    return out


async def test_cron_catches_up_in_order_and_never_refires_across_sigkill(tmp_path):
    # The first start only creates the marker (the trigger is watched from now, nothing to catch
    # up). Its schedule cannot fire meanwhile: a fire there, when a minute boundary fell before
    # the kill, would be offered again once the marker is moved back.
    daemon = Daemon(write_config(tmp_path, BODY.replace('"* * * * *"', '"0 0 1 1 *"')))
    db = tmp_path / "var" / "lambdaemon.db"
    try:
        await daemon.start()
        await daemon.wait_log("cron_started")
        await daemon.kill()
        write_config(tmp_path, BODY, api_port=daemon.api_port)
        first = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=4)
        set_marker(db, first - timedelta(minutes=1))  # as if down since just after that fire

        await daemon.start()
        runs = await daemon.wait_logged(lambda: _final(daemon, 5), timeout_s=30)
        await daemon.kill()
        await daemon.start()  # the restart must not offer any of those fires again
        await daemon.wait_log("cron_started", 3)
    finally:
        await daemon.close()
    # A minute may roll over during the test: every minute up to now once, none twice.
    expected = minutes(first, datetime.now(UTC))
    assert [r["dedupe_key"] for r in runs] == expected[: len(runs)]
    assert all(r["status"] == "succeeded" for r in runs)
    stored = stored_keys(db)
    assert len(runs) <= len(stored) and stored == expected[: len(stored)]
    fired = [e for e in daemon.log_events() if e.get("event") == "cron_fired"]
    assert sorted(f"cron:echo#0@{e['nominal']}" for e in fired) == stored  # each offered once
    assert all(e["created"] for e in fired)
    catch_up = [e for e in daemon.log_events() if e.get("event") == "cron_catch_up"]
    assert catch_up[0]["fires"] >= 5 and catch_up[0]["first"] == expected[0].split("@")[1]


def stored_keys(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT dedupe_key FROM invocations WHERE trigger = 'cron' ORDER BY dedupe_key"
        ).fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows]


async def _final(daemon: Daemon, count: int) -> list[dict] | None:
    # Read through the admin API, after the store's barrier: re-checked as the daemon logs.
    runs = await cron_runs(daemon)
    done = [r for r in runs if r["status"] in ("succeeded", "failed", "crashed", "timed_out")]
    return runs if len(done) >= count and len(done) == len(runs) else None
