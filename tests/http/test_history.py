"""History pages and usage through the real daemon's /v1 API and the CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import ROOT, Daemon, running_daemon, write_config

FUNCS = Path(__file__).resolve().parents[1] / "functions"
BODY = f"""
[functions.echo]
handler = "handler.handler"
code = "{FUNCS / "echo"}"
memory_mb = 256

[functions.boom]
handler = "handler.handler"
code = "{FUNCS / "boom"}"
"""


async def get(daemon: Daemon, path: str) -> tuple[int, Any]:
    assert daemon.session is not None
    async with daemon.session.get(f"{daemon.base}{path}") as resp:
        return resp.status, await resp.json()


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args, "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.fixture
async def daemon(tmp_path):
    async with running_daemon(tmp_path, BODY) as d:
        yield d


async def invoke_some(daemon: Daemon) -> tuple[list[str], list[str]]:
    """Five echo calls and two boom calls, in that order; their request ids."""
    ids: dict[str, list[str]] = {"echo": [], "boom": []}
    for name in ["echo"] * 5 + ["boom"] * 2:
        _, headers, _ = await daemon.invoke(name, {"n": 1})
        ids[name].append(headers["x-amzn-RequestId"])
    return ids["echo"], ids["boom"]


async def all_pages(daemon: Daemon, query: str) -> tuple[list[str], int]:
    got, pages, cursor = [], 0, None
    while True:
        suffix = f"&cursor={cursor}" if cursor else ""
        status, body = await get(daemon, f"/v1/invocations?{query}{suffix}")
        assert status == 200, body
        pages += 1
        got += [r["id"] for r in body["invocations"]]
        cursor = body["next"]
        if cursor is None:
            return got, pages


async def test_history_pages_and_filters_over_the_api(daemon: Daemon) -> None:
    before = datetime.now(UTC).isoformat()
    echo, boom = await invoke_some(daemon)
    newest_first = [*reversed(boom), *reversed(echo)]
    assert await all_pages(daemon, "limit=2") == (newest_first, 4)
    assert await all_pages(daemon, "limit=7") == (newest_first, 1)  # no empty last page
    assert (await all_pages(daemon, "function=boom&status=failed"))[0] == boom[::-1]
    assert (await all_pages(daemon, "status=succeeded&limit=3"))[0] == echo[::-1]
    assert (await all_pages(daemon, "trigger=api&function=echo"))[0] == echo[::-1]
    assert (await all_pages(daemon, "trigger=cron"))[0] == []
    assert (await all_pages(daemon, "version=%24LATEST&limit=1"))[0] == newest_first
    assert (await all_pages(daemon, "version=3"))[0] == []
    assert (await all_pages(daemon, f"id={echo[2]}"))[0] == [echo[2]]
    assert (await all_pages(daemon, f"request_id={boom[0]}"))[0] == [boom[0]]
    since = urllib.parse.quote(before)
    assert (await all_pages(daemon, f"since={since}"))[0] == newest_first
    assert (await all_pages(daemon, f"until={since}"))[0] == []
    assert (await all_pages(daemon, "since=1h&until=2099-01-01"))[0] == newest_first
    assert (await all_pages(daemon, "since=2099-01-01T00:00:00%2B02:00"))[0] == []


BAD = [
    ("/v1/invocations?bogus=1", "bogus"),
    ("/v1/invocations?function=echo&Function=echo", "Function"),
    ("/v1/invocations?limit=0", "limit"),
    ("/v1/invocations?limit=1001", "limit"),
    ("/v1/invocations?limit=ten", "limit"),
    ("/v1/invocations?limit=1&limit=2", "limit"),
    ("/v1/invocations?cursor=%21%21", "cursor"),
    ("/v1/invocations?cursor=aGVsbG8", "cursor"),  # base64 of something else
    ("/v1/invocations?since=yesterday", "since"),
    ("/v1/invocations?since=2026-12-04T10:00:00", "since"),  # no offset: whose 10 o'clock?
    ("/v1/invocations?until=2026-13-01T00:00:00Z", "until"),
    ("/v1/invocations?since=1h&until=2h", "until"),
    ("/v1/invocations?status=done", "status"),
    ("/v1/invocations?function=", "function"),
    ("/v1/invocations?id=a&request_id=b", "request_id"),
    ("/v1/usage?by=week", "by"),
    ("/v1/usage?since=soon", "since"),
    ("/v1/usage?function=echo", "function"),
]


async def test_history_and_usage_refuse_bad_parameters_naming_them(daemon: Daemon) -> None:
    for path, name in BAD:
        status, body = await get(daemon, path)
        assert (status, body["parameter"]) == (400, name), (path, body)
        assert body["error"].startswith(f"{name}: "), body


async def test_usage_over_the_api_and_the_cli(daemon: Daemon) -> None:
    await invoke_some(daemon)
    status, body = await get(daemon, "/v1/usage?by=function")
    assert status == 200, body
    rows = {r["function"]: r for r in body["usage"]}
    assert (rows["echo"]["requests"], rows["echo"]["errors"]) == (5, 0)
    assert (rows["boom"]["requests"], rows["boom"]["errors"]) == (2, 2)
    for name, memory_mb in (("echo", 256), ("boom", 128)):
        row = rows[name]
        assert row["billed_duration_ms"] >= row["requests"]  # 1 ms at least, each
        assert row["gb_seconds"] == pytest.approx(
            memory_mb / 1024 * row["billed_duration_ms"] / 1000, abs=1e-6
        )
        cost = row["requests"] * 0.0000002 + row["gb_seconds"] * 0.0000166667
        assert row["cost_usd"]["total"] == pytest.approx(cost, abs=1e-7)
    assert body["total"]["requests"] == 7
    status, by_day = await get(daemon, "/v1/usage?since=1d")
    today = datetime.now(UTC).date().isoformat()
    assert [(r["day"], r["requests"]) for r in by_day["usage"]] == [(today, 7)]

    result = await asyncio.to_thread(cli, daemon, "usage", "--by", "function")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["FUNCTION", "REQUESTS", "ERRORS"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["boom", "2", "2"],
        ["echo", "5", "0"],
        ["total", "7", "2"],
    ]


async def test_cli_invocations_filters_and_prints_every_page(daemon: Daemon) -> None:
    echo, boom = await invoke_some(daemon)
    result = await asyncio.to_thread(cli, daemon, "invocations", "--all", "--limit", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ID") and sum(line.startswith("ID") for line in lines) == 1
    assert [line.split()[0] for line in lines[1:]] == [*reversed(boom), *reversed(echo)]
    result = await asyncio.to_thread(
        cli, daemon, "--json", "invocations", "--function", "boom", "--since", "1h", "--all"
    )
    assert [r["id"] for r in json.loads(result.stdout)] == boom[::-1]
    result = await asyncio.to_thread(cli, daemon, "invocations", "--since", "later")
    assert result.returncode != 0 and "since: 'later' is not a time" in result.stderr


async def test_usage_counts_each_attempt_once_across_kill_9(tmp_path: Path) -> None:
    body = f"""
[functions.slow]
handler = "handler.handler"
code = "{FUNCS / "slow"}"
concurrency = 4
timeout_s = 10
retries = 2
"""
    daemon = Daemon(write_config(tmp_path, body))
    await daemon.start()
    try:
        ids = []
        for n in range(12):
            _, headers, _ = await daemon.invoke("slow", {"sleep_s": 0.3, "n": n}, kind="Event")
            ids.append(headers["x-amzn-RequestId"])
        await daemon.wait_log("invocation_finished")  # some finished, some are running
        await daemon.kill()
        await daemon.start()  # recovery records the interrupted attempts, then runs them again
        for invocation_id in ids:
            await daemon.finished(invocation_id, status="succeeded", timeout_s=30)
        status, usage = await get(daemon, "/v1/usage")
    finally:
        await daemon.close()
    db = daemon.config.parent / "var" / "lambdaemon.db"
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        attempts, crashed = conn.execute(
            "SELECT count(*), sum(status = 'crashed') FROM attempts"
        ).fetchone()
    finally:
        conn.close()
    assert crashed >= 1  # the kill interrupted attempts, and they count as attempts
    assert usage["total"]["requests"] == attempts
    assert usage["total"]["errors"] == crashed
