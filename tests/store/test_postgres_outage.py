"""A PostgreSQL server that goes away, for real (its own cluster, stopped and started again with
pg_ctl): the store is degraded, nothing is acknowledged that was not stored, and it all resumes
by itself once the server is back."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.store.health import StoreHealth
from daemon.store.pgstore import PgStore
from tests.daemon_proc import ROOT, Daemon, running_daemon
from tests.postgres import Postgres
from tests.store.test_store import new

FUNCS = Path(__file__).resolve().parents[1] / "functions"


@pytest.fixture
def own_cluster() -> Iterator[Postgres]:
    """A cluster of this test's own: the session's must stay up for the others."""
    cluster = Postgres()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_store_health_says_unreachable_and_comes_back(own_cluster, tmp_path):
    database = own_cluster.create_database()
    async with PgStore.open_url(tmp_path, own_cluster.params(database), database) as store:
        health = StoreHealth(store)
        assert await store.insert(new("before")) == ("before", True)
        own_cluster.pg_ctl("stop")
        with pytest.raises(OSError):  # StoreUnavailableError: the write is not acknowledged
            await store.insert(new("during"))
        await health.check()
        report = health.report()
        assert (report["status"], report["reason"]) == ("degraded", "unreachable")
        assert report["store"]["backend"] == "postgresql"
        assert "password" not in str(report)
        with pytest.raises(OSError):  # a read says so too, and does not hang
            await store.status_of("before")
        own_cluster.pg_ctl("start")
        await health.check()  # the probe opens the writer's connection again
        assert health.report()["status"] == "ok"
        assert await store.insert(new("after")) == ("after", True)
        assert await store.status_of("before") == "queued"  # the reader's, again too
        assert await store.status_of("during") is None


async def test_daemon_refuses_while_postgresql_is_away_and_resumes(own_cluster, tmp_path):
    url = own_cluster.url(own_cluster.create_database())
    body = (
        f'[functions.slow]\nhandler = "handler.handler"\ncode = "{FUNCS / "slow"}"\n'
        "concurrency = 1\ntimeout_s = 10\n"
        f'\n[store]\nurl = "{url}"\npassword_file = "{own_cluster.password_file}"\n'
    )
    async with running_daemon(tmp_path, body) as daemon:
        status, headers, _ = await daemon.invoke("slow", {"sleep_s": 1.5}, kind="Event")
        assert status == 202
        running = headers["x-amzn-RequestId"]
        await daemon.wait_log("invocation_started", invocation_id=running)
        own_cluster.pg_ctl("stop")  # while it runs: its outcome cannot be recorded yet

        status, _, answer = await daemon.invoke("slow", {"sleep_s": 0}, kind="Event")
        assert status == 503, answer  # refused, not acknowledged
        assert b"cannot store the event" in answer

        async def degraded() -> Any:
            status, report = await health(daemon)
            return report if status == 503 else None

        report = await daemon.wait_logged(degraded)
        assert (report["status"], report["reason"]) == ("degraded", "unreachable")
        (loud, *_) = [e for e in daemon.log_events() if e.get("event") == "store_degraded"]
        assert loud["level"] == "error" and loud["reason"] == "unreachable"
        assert loud["url"].startswith("lambdaemon@127.0.0.1:")

        mark = len(daemon.log_events())
        own_cluster.pg_ctl("start")
        await daemon.wait_log("store_restored", since=mark, timeout_s=40)
        assert (await health(daemon))[0] == 200
        status, headers, _ = await daemon.invoke("slow", {"sleep_s": 0}, kind="Event")
        assert status == 202
        after = headers["x-amzn-RequestId"]

        async def final() -> bool:
            rows = await daemon.invocations(function="slow")
            return {r["id"] for r in rows if r["status"] == "succeeded"} == {running, after}

        # The outcome written during the outage is kept and written again (with backoff).
        await daemon.wait_for(final, timeout_s=40)


async def health(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    assert daemon.session is not None
    async with daemon.session.get(f"{daemon.base}/health") as resp:
        return resp.status, await resp.json()


async def test_a_second_daemon_with_the_same_node_id_refuses_to_start(pg_cluster, tmp_path):
    """One daemon per node id on a database (both take the host name here): the second exits
    65 and says why."""
    database = pg_cluster.create_database()
    async with PgStore.open_url(tmp_path, pg_cluster.params(database), database):
        config = tmp_path / "second.toml"
        config.write_text(
            f'[daemon]\ndata_dir = "var"\n[store]\nurl = "{pg_cluster.url(database)}"\n'
            f'password_file = "{pg_cluster.password_file}"\n'
        )
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert result.returncode == 65, result.stderr
    assert f"another lambdaemon with node_id '{socket.gethostname()}' is running" in result.stderr
    assert "each node of a fleet needs its own ([daemon] node_id)" in result.stderr
