"""The database file deleted or replaced under a running store: it stops acknowledging for good,
says why on /health, and a restart starts on whatever file is at the path then."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.errors import StoreReplacedError, StoreUnavailableError
from daemon.store.health import StoreHealth
from daemon.store.sqlite import NewInvocation, Store
from tests.daemon_proc import Daemon, running_daemon

FUNCS = Path(__file__).resolve().parents[1] / "functions"


def new(id: str) -> NewInvocation:
    return NewInvocation(
        id=id,
        function="f",
        function_version="$LATEST",
        trigger="test",
        invocation_type="async",
        event=b"{}",
        queued_at=time.time(),
    )


def remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


async def test_store_refuses_every_write_once_its_file_is_deleted(tmp_path: Path) -> None:
    db = tmp_path / "lambdaemon.db"
    async with Store.open(db) as store:
        health = StoreHealth(store)
        await store.insert(new("before"))
        await health.check()
        assert health.report()["status"] == "ok" and store.replaced is None
        remove_db(db)
        with capture_logs() as logs, pytest.raises(StoreReplacedError) as refused:
            await store.insert(new("after"))  # committed into the unlinked file: not "stored"
        assert isinstance(refused.value, StoreUnavailableError)  # intake answers 503
        assert "restart lambdaemon" in str(refused.value)
        with pytest.raises(StoreReplacedError):
            await store.insert(new("later"))  # refused without a try
        assert [e["event"] for e in logs].count("store_file_replaced") == 1
        with capture_logs() as logs:
            await health.check()
        report = health.report()
        assert (report["status"], report["reason"]) == ("degraded", "replaced")
        assert str(db) in report["error"] and report["store"]["path"] == str(db)
        (degraded,) = [e for e in logs if e["event"] == "store_degraded"]
        assert degraded["reason"] == "replaced" and degraded["log_level"] == "error"
        await health.check()
        assert health.report()["reason"] == "replaced"  # for good: no probe brings it back
    assert not db.exists()  # closing created nothing at the path


async def test_store_health_sees_a_file_moved_over_the_idle_store(tmp_path: Path) -> None:
    db = tmp_path / "lambdaemon.db"
    async with Store.open(db) as store:
        await store.insert(new("a"))
        health = StoreHealth(store)
        other = tmp_path / "restored.db"
        other.write_bytes(db.read_bytes())  # another file with the same name and bytes
        os.replace(other, db)
        await health.check()  # no write since: the check's own look finds it
        assert health.report()["reason"] == "replaced"
        assert "replaced by another file" in (store.replaced or "")
        with pytest.raises(StoreReplacedError):
            await store.barrier()


# --- the whole daemon ---------------------------------------------------------------------------


async def health(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    assert daemon.session is not None
    async with daemon.session.get(f"{daemon.base}/health") as resp:
        return resp.status, await resp.json()


async def test_daemon_with_its_database_deleted_answers_503_until_restarted(
    tmp_path: Path,
) -> None:
    body = f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n'
    db = tmp_path / "var" / "lambdaemon.db"
    async with running_daemon(tmp_path, body) as daemon:
        # Async calls keep coming while the files go: every 202 answered to a request sent after
        # the unlink would be an event that the restart below cannot find.
        sent: list[tuple[float, int]] = []  # (sent at, status)
        stop = asyncio.Event()

        async def client() -> None:
            n = 0
            while not stop.is_set():
                at = time.monotonic()
                status, _, _ = await daemon.invoke("echo", {"n": n}, kind="Event")
                sent.append((at, status))
                n += 1

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await daemon.wait_for(lambda: len(sent) >= 40)
        remove_db(db)
        removed = time.monotonic()
        await daemon.wait_for(lambda: sum(at > removed for at, _ in sent) >= 40)
        stop.set()
        await asyncio.gather(*clients)
        after = [status for at, status in sent if at > removed]
        assert set(after) == {503}, after
        assert 202 in {status for at, status in sent if at < removed}

        status, report = await health(daemon)
        assert status == 503 and report["reason"] == "replaced"
        assert str(db) in report["error"] and "restart lambdaemon" in report["error"]
        (logged, *_) = await daemon.wait_log("store_degraded")
        assert logged["reason"] == "replaced"
        assert len([e for e in daemon.log_events() if e["event"] == "store_file_replaced"]) == 1
        # A sync call still gets its answer: the handler needs no store to run.
        status, _, answer = await daemon.invoke("echo", {"sync": True})
        assert status == 200 and b"sync" in answer

        await daemon.stop()
        assert not db.exists()  # the old daemon's close put nothing at the path
        await daemon.start()  # a new, empty database at the path
        assert (await health(daemon))[0] == 200
        status, headers, _ = await daemon.invoke("echo", {"after": "restart"}, kind="Event")
        assert status == 202
        await daemon.finished(headers["x-amzn-RequestId"], status="succeeded")
