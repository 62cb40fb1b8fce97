"""A full disk for real (a small tmpfs): reported loudly, nothing acknowledged that was not stored,
and everything resumes once there is room again."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from daemon.deferred import MAX_BYTES, MAX_RECORDS, DeferredRecords
from daemon.errors import StoreUnavailableError
from daemon.models import Outcome, Status
from daemon.store.health import StoreHealth
from daemon.store.sqlite import NewInvocation, Store
from tests.daemon_proc import Daemon, free_port, running_daemon
from tests.mosquitto import running_broker
from tests.waits import until

FUNCS = Path(__file__).resolve().parents[1] / "functions"


@contextlib.contextmanager
def small_filesystem(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` at `path`: a disk that really fills (ENOSPC, SQLITE_FULL)."""
    path.mkdir(parents=True)
    # The suite runs as root (tests/run, CI); a full-disk test that cannot fill a disk would
    # check nothing, so this fails rather than skips.
    assert os.geteuid() == 0, "the full-disk tests mount a small tmpfs and need root"
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)]
    result = subprocess.run(mount, capture_output=True, text=True)
    assert result.returncode == 0, f"cannot mount a tmpfs at {path}: {result.stderr.strip()}"
    try:
        yield path
    finally:  # lazy: a daemon killed on a failure may still hold its files for a moment
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem holding `directory`; unlink the file to return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
        with pytest.raises(OSError) as full:
            os.write(fd, b"\0")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def test_store_health_sees_a_full_disk_and_its_end(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", 2048) as small:
        async with Store.open(small / "lambdaemon.db") as store:
            health = StoreHealth(store)
            await health.check()
            assert health.report()["status"] == "ok"
            filler = fill(small)
            with pytest.raises(StoreUnavailableError):
                for _ in range(100):  # until the WAL needs a page the disk does not have
                    await store.insert(
                        NewInvocation(
                            id=str(uuid.uuid4()),
                            function="f",
                            function_version="$LATEST",
                            trigger="test",
                            invocation_type="async",
                            event=b'"' + b"x" * 8192 + b'"',
                            queued_at=time.time(),
                        )
                    )
            with capture_logs() as logs:
                await health.check()
            report = health.report()
            assert (report["status"], report["reason"]) == ("degraded", "disk_full")
            assert "full" in report["error"] and report["store"]["disk_free_mb"] == 0
            (degraded,) = [e for e in logs if e["event"] == "store_degraded"]
            assert degraded["log_level"] == "error" and degraded["reason"] == "disk_full"
            filler.unlink()
            with capture_logs() as logs:
                await health.check()
            assert health.report()["status"] == "ok"
            assert [e["reason"] for e in logs if e["event"] == "store_restored"] == ["disk_full"]


# --- the whole daemon ---------------------------------------------------------------------------


def body(mqtt_port: int, hook_port: int, inbox: Path) -> str:
    return f"""
[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
client_id = "lambdaemon-full-disk"

[webhooks]
listen = "127.0.0.1:{hook_port}"

[functions.echo]
handler = "handler.handler"
code = "{FUNCS / "echo"}"
concurrency = 2

[[functions.echo.triggers]]
type = "webhook"
path = "/hook"
mode = "async"

[[functions.echo.triggers]]
type = "mqtt"
topic = "disk/#"

[[functions.echo.triggers]]
type = "files"
path = "{inbox}"

[[functions.echo.triggers]]
type = "cron"
schedule = "*/2 * * * * *"
"""


def events(daemon: Daemon, name: str, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events()[since:] if e.get("event") == name]


async def logged(daemon: Daemon, name: str, since: int = 0) -> list[dict[str, Any]]:
    """Wait (bounded) until the daemon has logged `name` after position `since`."""
    return await daemon.wait_log(name, since=since)


async def health(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    assert daemon.session is not None
    async with daemon.session.get(f"{daemon.base}/health") as resp:
        return resp.status, await resp.json()


async def post(daemon: Daemon, port: int, payload: dict[str, Any]) -> int:
    assert daemon.session is not None
    async with daemon.session.post(f"http://127.0.0.1:{port}/hook", json=payload) as resp:
        return resp.status


async def test_store_full_disk_refuses_instead_of_acknowledging_then_recovers(
    tmp_path: Path,
) -> None:
    inbox, hook_port = tmp_path / "inbox", free_port()
    with (
        small_filesystem(tmp_path / "var", 4096) as var,
        running_broker(tmp_path / "mosquitto") as broker,
    ):
        async with running_daemon(
            tmp_path, body(broker.port, hook_port, inbox), daemon="max_db_mb = 8"
        ) as daemon:
            for ready in ("webhook_listening", "mqtt_subscribed", "files_rescanned", "cron_fired"):
                await logged(daemon, ready)
            filler = fill(var)

            # Webhooks: 202 only for what was committed; 503 once nothing more fits.
            accepted, statuses = 0, []
            while not statuses or statuses[-1] == 202:
                statuses.append(await post(daemon, hook_port, {"pad": "x" * 4096}))
                assert len(statuses) < 500, "the disk never filled"
            accepted = statuses.count(202)
            assert statuses[-1] == 503

            async def degraded() -> Any:
                status, report = await health(daemon)
                return report if status == 503 else None

            report = await daemon.wait_logged(degraded)  # store_degraded comes with it
            assert (report["status"], report["reason"]) == ("degraded", "disk_full")
            (loud, *_) = events(daemon, "store_degraded")
            assert loud["level"] == "error" and loud["reason"] == "disk_full"

            # MQTT: the broker took it (it acked our publisher), the daemon does not ack it.
            marker = {"marker": "published while the disk was full"}
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5
            ) as publisher:
                await publisher.publish("disk/sensor", json.dumps(marker), qos=1)
            await logged(daemon, "mqtt_message_not_stored")
            # Files: claimed, not committed: it waits in the inbox's .processing/ and is retried.
            (inbox / "drop.json").write_text(json.dumps({"dropped": True}))
            await logged(daemon, "files_commit_failed")
            assert (inbox / ".processing" / "drop.json").exists()
            assert not list((inbox / "done").glob("*drop.json"))
            # Cron: the fire is not marked, so the same nominal time is retried.
            (failed_fire, *_) = await logged(daemon, "cron_fire_failed")

            mark = len(daemon.log_events())
            filler.unlink()  # room again
            await logged(daemon, "store_restored", mark)
            assert (await health(daemon))[0] == 200
            assert await post(daemon, hook_port, {"after": True}) == 202

            async def delivered() -> Any:  # records after the store's barrier; files_done
                rows = await daemon.invocations(function="echo")
                mqtt = [r for r in rows if r["trigger"] == "mqtt"]
                files = list((inbox / "done").glob("*drop.json"))
                done = mqtt and all(r["status"] == "succeeded" for r in mqtt) and files
                return (mqtt, rows) if done else None

            mqtt, rows = await daemon.wait_logged(delivered, timeout_s=40)
            assert len(mqtt) == 1  # redelivered by the broker once there was room: stored once
            record = await daemon.get(f"/v1/invocations/{mqtt[0]['id']}")
            assert record["event"]["payload"] == marker
            assert len([r for r in rows if r["trigger"] == "webhook"]) == accepted + 1
            fired = [
                e
                for e in events(daemon, "cron_fired", mark)
                if e["nominal"] == failed_fire["nominal"]
            ]
            assert fired, "the failed cron fire was retried until it committed"
            print(
                f"\n{accepted} webhooks accepted before the disk was full; degraded for "
                f"{events(daemon, 'store_restored', mark)[0]['after_s']} s"
            )


async def test_store_full_disk_mid_invocation_finishes_once_there_is_room(tmp_path: Path) -> None:
    slow = f'[functions.slow]\nhandler = "handler.handler"\ncode = "{FUNCS / "slow"}"\n'
    with small_filesystem(tmp_path / "var", 4096) as var:
        async with running_daemon(tmp_path, slow + "concurrency = 1\ntimeout_s = 10\n") as daemon:
            ids = []
            for sleep_s in (1.5, 0):  # the second waits in the lane behind the first
                status, headers, _ = await daemon.invoke("slow", {"sleep_s": sleep_s}, kind="Event")
                assert status == 202
                ids.append(headers["x-amzn-RequestId"])
            filler = fill(var)  # while the first one runs: its outcome cannot be recorded
            await logged(daemon, "store_degraded")
            await logged(daemon, "invocation_outcome_not_recorded")
            mark = len(daemon.log_events())
            filler.unlink()
            await logged(daemon, "store_restored", mark)

            async def final() -> bool:
                rows = await daemon.invocations(function="slow")
                return {r["id"] for r in rows if r["status"] == "succeeded"} == set(ids)

            # Polled: the first outcome's retried write logs nothing when it lands.
            await daemon.wait_for(final, timeout_s=8)  # healthy, this takes ~1.5 s


# --- sync calls answered during a full disk ------------------------------------------------------


def sync_call(n: int, pad: int = 64) -> tuple[NewInvocation, Outcome]:
    at = time.time()
    inv = NewInvocation(
        id=str(uuid.uuid4()),
        function="f",
        function_version="$LATEST",
        trigger="api",
        invocation_type="sync",
        event=json.dumps({"n": n, "pad": "x" * pad}).encode(),
        queued_at=at,
        status=Status.RUNNING,
        attempt=1,
        started_at=at,
    )
    return inv, Outcome(Status.SUCCEEDED, b'{"ok": true}', at, at + 0.001, 1.0, logs="END\n")


async def test_deferred_sync_records_are_bounded_and_written_once_there_is_room(
    tmp_path: Path,
) -> None:
    with small_filesystem(tmp_path / "small", 64 * 1024) as small:
        async with Store.open(small / "lambdaemon.db") as store:
            deferred = DeferredRecords(store)
            health = StoreHealth(store, deferred)
            filler = fill(small)
            with capture_logs() as logs:
                # By count: MAX_RECORDS small records wait, the rest are dropped and counted
                # (checked before the first await: nothing was written yet).
                calls = [sync_call(n) for n in range(MAX_RECORDS + 5)]
                for inv, outcome in calls:
                    deferred.add(inv, outcome)
                assert (deferred.pending, deferred.dropped) == (MAX_RECORDS, 5)
                figures = health.report()["store"]
                assert figures["sync_records_pending"] == MAX_RECORDS
                assert figures["sync_records_dropped"] == 5
                assert 0 < figures["sync_records_pending_mb"] < MAX_BYTES / 1024 / 1024
                # The disk is full: the first tries fail, and the records keep waiting.
                await until(lambda: store.write_failures > 0, timeout_s=20, what="a failure")
            (dropped,) = [e for e in logs if e["event"] == "sync_records_dropped"]  # once
            assert dropped["log_level"] == "error" and dropped["dropped"] == 1
            assert [e["event"] for e in logs].count("sync_records_deferred") == 1
            assert deferred.pending > 0

            filler.unlink()
            with capture_logs() as logs:
                await until(lambda: deferred.pending == 0, timeout_s=40, what="written")
            (written,) = [e for e in logs if e["event"] == "sync_records_written"]
            assert written["records"] == MAX_RECORDS
            rows = await store.query("SELECT count(*), min(status), max(status) FROM invocations")
            assert tuple(rows[0]) == (MAX_RECORDS, "succeeded", "succeeded")
            kept = {inv.id for inv, _ in calls[:MAX_RECORDS]}
            assert {r[0] for r in await store.query("SELECT id FROM invocations")} == kept
            assert health.report()["store"]["sync_records_pending"] == 0

            # By bytes: 32 MB of events and results, whichever bound comes first.
            for n in range(5):
                deferred.add(*sync_call(n, pad=9 * 1024 * 1024))
            assert deferred.pending == 3 and deferred.dropped == 5 + 2
            assert deferred.bytes <= MAX_BYTES
            await deferred.close()  # the store takes them now: none is lost
            rows = await store.query("SELECT count(*) FROM invocations")
            assert rows[0][0] == MAX_RECORDS + 3


async def test_sync_calls_answered_during_a_full_disk_are_recorded_once_there_is_room(
    tmp_path: Path,
) -> None:
    echo = f'[functions.echo]\nhandler = "handler.handler"\ncode = "{FUNCS / "echo"}"\n'
    with small_filesystem(tmp_path / "var", 4096) as var:
        async with running_daemon(tmp_path, echo) as daemon:
            filler = fill(var)
            answered: list[str] = []

            async def call() -> None:
                status, headers, body = await daemon.invoke("echo", {"during": len(answered)})
                assert status == 200 and b"during" in body  # the caller gets its answer
                answered.append(headers["x-amzn-RequestId"])

            # The WAL may still have room for a few records; then they start to wait.
            while not events(daemon, "sync_records_deferred"):
                await call()
                assert len(answered) < 2000, "the disk never filled"
            for _ in range(10):
                await call()

            async def waiting() -> Any:
                status, report = await health(daemon)
                pending = report["store"].get("sync_records_pending", 0)
                return report if status == 503 and pending >= 10 else None

            report = await daemon.wait_logged(waiting)
            assert report["reason"] == "disk_full" and report["store"]["sync_records_dropped"] == 0
            assert not events(daemon, "invocation_record_failed")

            mark = len(daemon.log_events())
            filler.unlink()
            await logged(daemon, "store_restored", mark)
            (written, *_) = await logged(daemon, "sync_records_written", mark)
            assert written["records"] >= 10
            rows = {r["id"]: r for r in await daemon.invocations(function="echo")}
            assert set(rows) == set(answered)  # every call answered is recorded, once
            assert all(r["status"] == "succeeded" for r in rows.values())
            record = await daemon.get(f"/v1/invocations/{answered[-3]}")
            assert record["event"] == {"during": len(answered) - 3}
            assert record["invocation_type"] == "sync"
            assert (await health(daemon))[1]["store"]["sync_records_pending"] == 0
