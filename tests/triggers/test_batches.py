"""Batches (daemon/batches.py) inside the real daemon: a real Mosquitto, real folders, real
workers, SIGKILL. Every wait is bounded and woken by the daemon's log: `batch_settled` is
logged once a batch and its items' outcomes are committed.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.batches import INVALID_RESPONSE, ITEM_FAILED, build_event, failed_items
from daemon.config import load_config
from daemon.errors import ConfigError
from tests.daemon_proc import ROOT, Daemon, Gate, running_daemon, shared_folder, write_config
from tests.mosquitto import Mosquitto
from tests.triggers.test_files import drop, finished
from tests.triggers.test_mqtt import publish, subscribed
from tests.waits import until_changed

FUNCS = Path(__file__).resolve().parent / "functions"


# --- the shape, as pure functions ----------------------------------------------------------------


def test_batch_event_adds_message_id_to_each_event_in_order() -> None:
    body = build_event([("a", b'{"topic":"t","payload":1}'), ("b", b"[1,2]"), ("c", b"{}")])
    assert json.loads(body) == {
        "Records": [
            {"topic": "t", "payload": 1, "messageId": "a"},
            {"messageId": "b", "body": [1, 2]},
            {"messageId": "c"},
        ]
    }


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (None, set()),
        ({}, set()),
        ("done", set()),  # no batchItemFailures: nothing reported failed
        ({"batchItemFailures": None}, set()),
        ({"batchItemFailures": []}, set()),
        ({"batchItemFailures": [{"itemIdentifier": "b"}]}, {"b"}),
        ({"batchItemFailures": [{"itemIdentifier": "a"}, {"itemIdentifier": "b"}]}, {"a", "b"}),
        ({"batchItemFailures": "b"}, "batchItemFailures is not a list"),
        ({"batchItemFailures": [{"itemIdentifier": ""}]}, "has no itemIdentifier"),
        ({"batchItemFailures": [{"itemIdentifier": None}]}, "has no itemIdentifier"),
        ({"batchItemFailures": [{"itemId": "b"}]}, "has no itemIdentifier"),
        ({"batchItemFailures": ["b"]}, "has no itemIdentifier"),
        ({"batchItemFailures": [{"itemIdentifier": "z"}]}, "'z' is no item of this batch"),
    ],
)
def test_batch_item_failures_are_read_as_lambda_reads_them(response: Any, expected: Any) -> None:
    got = failed_items(msgspec.json.encode(response), {"a", "b"})
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got
    else:
        assert got == expected
    assert isinstance(failed_items(b"{not json", {"a"}), str)


def test_batch_settings_are_checked(tmp_path: Path) -> None:
    def config(trigger: str) -> Path:
        return write_config(
            tmp_path,
            f'[functions.f]\nhandler = "handler.handler"\ncode = "{FUNCS / "batch_record"}"\n'
            f'[[functions.f.triggers]]\ntype = "files"\npath = "in"\n{trigger}\n',
        )

    assert load_config(config("batch_size = 10\nbatch_window_s = 0.5")).functions["f"]
    for bad, key in (
        ("batch_size = 0", "batch_size"),
        ("batch_size = 10001", "batch_size"),
        ("batch_size = 5\nbatch_window_s = 301", "batch_window_s"),
        ("batch_window_s = 1", "batch_window_s"),  # a window without a batch
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(config(bad))


# --- helpers -------------------------------------------------------------------------------------


def mqtt_batch_toml(
    url: str,
    log: Path,
    *,
    size: int,
    window_s: float,
    extra: str = "",
    code: str = "batch_record",
    gate: Path | None = None,
) -> str:
    env = f'BATCH_LOG = "{log}"\n' + (f'BATCH_GATE = "{gate}"\n' if gate else "")
    return (
        f'[mqtt]\nurl = "{url}"\nclient_id = "lambdaemon-batches"\n'
        f'[functions.b]\nhandler = "handler.handler"\ncode = "{FUNCS / code}"\n'
        f"retry_backoff_s = [0.05, 0.05]\n{extra}\n"
        f"[functions.b.env]\n{env}"
        f'[[functions.b.triggers]]\ntype = "mqtt"\ntopic = "batch/+"\n'
        f"batch_size = {size}\nbatch_window_s = {window_s}\n"
    )


def rows(daemon: Daemon, sql: str, *params: Any) -> list[sqlite3.Row]:
    db = daemon.config.parent / "var" / "lambdaemon.db"
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def items(daemon: Daemon) -> list[sqlite3.Row]:
    """The message rows (not the batches), in arrival order."""
    return rows(
        daemon,
        "SELECT id, status, attempt, batch_id, dead_letter_reason, error_type, event"
        " FROM invocations WHERE trigger != 'batch' ORDER BY queued_at, id",
    )


def batches(log: Path) -> list[dict[str, Any]]:
    """What the handler was given, one entry per handler call."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def seqs(batch: dict[str, Any]) -> list[int]:
    return [r["payload"]["seq"] for r in batch["records"]]


def messages(start: int, stop: int, **extra: Any) -> list[tuple[str, bytes]]:
    return [("batch/a", json.dumps({"seq": i, **extra}).encode()) for i in range(start, stop)]


# --- forming batches -----------------------------------------------------------------------------


async def test_batches_form_by_size_without_waiting_out_the_window(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    log = shared_folder(tmp_path) / "batches.jsonl"
    body = mqtt_batch_toml(mosquitto.url, log, size=5, window_s=120)
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, *messages(0, 10))
        # Two full batches, long before the two-minute window could have sent them.
        settled = await daemon.wait_log("batch_settled", 2, timeout_s=20)
        assert [s["items"] for s in settled] == [5, 5]
        assert [seqs(b) for b in batches(log)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
        stored = items(daemon)
        assert all(r["status"] == "succeeded" and r["attempt"] == 1 for r in stored)
        # Each record is the message's event as a single invocation gets it, plus messageId:
        # the item's invocation id.
        for batch in batches(log):
            for record in batch["records"]:
                row = next(r for r in stored if r["id"] == record["messageId"])
                event = json.loads(row["event"])
                assert record == {**event, "messageId": row["id"]}
                assert row["batch_id"] == batch["id"]


async def test_batches_form_by_window_in_arrival_order(tmp_path: Path, mosquitto: Mosquitto):
    log = shared_folder(tmp_path) / "batches.jsonl"
    body = mqtt_batch_toml(mosquitto.url, log, size=100, window_s=0.5)
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, *messages(0, 7))
        (settled,) = await daemon.wait_log("batch_settled", timeout_s=20)
        assert settled["items"] == 7
        assert [seqs(b) for b in batches(log)] == [list(range(7))]
        # The batch waited out its window from the first message before it started.
        (batch,) = rows(daemon, "SELECT * FROM invocations WHERE trigger = 'batch'")
        first = min(r["queued_at"] for r in rows(daemon, "SELECT queued_at FROM invocations"))
        assert batch["started_at"] - first >= 0.45
        assert batch["trigger_id"] == "b#0" and batch["batch_id"] == batch["id"]


# --- outcomes ------------------------------------------------------------------------------------


async def test_partial_failure_retries_only_failed_items_then_dead_letters_each(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    log = shared_folder(tmp_path) / "batches.jsonl"
    body = mqtt_batch_toml(mosquitto.url, log, size=6, window_s=5, extra="retries = 2")
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        batch = [*messages(0, 2), *messages(2, 4, do="fail"), *messages(4, 6)]
        await publish(mosquitto.port, *batch)
        # The batch, then its two failed items twice more, as one smaller batch each time.
        settled = await daemon.wait_log("batch_settled", 3, timeout_s=20)
        assert [(s["items"], s["failed"], s["retrying"]) for s in settled] == [
            (6, 2, 2),
            (2, 2, 2),
            (2, 2, 0),
        ]
        assert [seqs(b) for b in batches(log)] == [list(range(6)), [2, 3], [2, 3]]
        dead = await daemon.wait_log("invocation_dead_lettered", 2)
        assert {d["reason"] for d in dead} == {"RetriesExhausted"}
        stored = items(daemon)
        by_seq = {json.loads(r["event"])["payload"]["seq"]: r for r in stored}
        for seq in (0, 1, 4, 5):
            assert by_seq[seq]["status"] == "succeeded" and by_seq[seq]["attempt"] == 1
        for seq in (2, 3):
            row = by_seq[seq]
            assert (row["status"], row["attempt"]) == ("failed", 3)
            assert (row["dead_letter_reason"], row["error_type"]) == (
                "RetriesExhausted",
                ITEM_FAILED,
            )
            record = await daemon.get(f"/v1/invocations/{row['id']}")
            # Each attempt names the batch it ran in: three batches, one per attempt.
            ran_in = [a["batch_id"] for a in record["attempts"]]
            assert ran_in == [b["id"] for b in batches(log)]
        dead_letters = (await daemon.get("/v1/dead-letters"))["dead_letters"]
        assert sorted(d["id"] for d in dead_letters) == sorted(by_seq[s]["id"] for s in (2, 3))


async def test_an_exception_or_a_bad_identifier_fails_the_whole_batch(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    log = shared_folder(tmp_path) / "batches.jsonl"
    body = mqtt_batch_toml(mosquitto.url, log, size=3, window_s=5, extra="retries = 0")
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, *messages(0, 2), *messages(2, 3, do="raise"))
        await publish(mosquitto.port, *messages(3, 5), *messages(5, 6, do="bad-id"))
        settled = await daemon.wait_log("batch_settled", 2, timeout_s=20)
        assert [(s["items"], s["failed"]) for s in settled] == [(3, 3), (3, 3)]
        await daemon.wait_log("invocation_dead_lettered", 6)
        stored = items(daemon)
        assert [(r["status"], r["attempt"]) for r in stored] == [("failed", 1)] * 6
        assert [r["error_type"] for r in stored] == ["RuntimeError"] * 3 + [INVALID_RESPONSE] * 3
        first, second = rows(
            daemon, "SELECT * FROM invocations WHERE trigger = 'batch' ORDER BY started_at"
        )
        assert (first["status"], first["error_type"]) == ("failed", "RuntimeError")
        # The handler returned: its batch record keeps what it said, its items failed.
        assert second["status"] == "succeeded"
        assert "no-such-item" in json.loads(second["result"])["batchItemFailures"][0].values()


async def test_powertools_batch_processor_reports_failures_the_daemon_honours(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    log = shared_folder(tmp_path) / "unused.jsonl"
    body = mqtt_batch_toml(
        mosquitto.url, log, size=4, window_s=5, extra="retries = 1", code="batch_powertools"
    )
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, *messages(0, 1), *messages(1, 2, do="fail"), *messages(2, 4))
        first, again = await daemon.wait_log("batch_settled", 2, timeout_s=20)
        assert (first["items"], first["failed"], again["items"], again["failed"]) == (4, 1, 1, 1)
        await daemon.wait_log("invocation_dead_lettered")
        stored = items(daemon)
        assert [(r["status"], r["attempt"]) for r in stored] == [
            ("succeeded", 1),
            ("failed", 2),
            ("succeeded", 1),
            ("succeeded", 1),
        ]
        batch = await daemon.get(f"/v1/invocations/{stored[0]['batch_id']}")
        assert batch["result"] == {"batchItemFailures": [{"itemIdentifier": stored[1]["id"]}]}


# --- crash and lookup ----------------------------------------------------------------------------


async def test_sigkill_mid_batch_reruns_its_items_as_their_next_attempt(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    log, gate = shared_folder(tmp_path) / "batches.jsonl", Gate(shared_folder(tmp_path) / "gate")
    body = mqtt_batch_toml(
        mosquitto.url, log, size=4, window_s=5, extra="timeout_s = 60", gate=gate.path
    )
    daemon = Daemon(write_config(tmp_path, body))
    try:
        await daemon.start()
        await subscribed(daemon)
        await publish(mosquitto.port, *messages(0, 4))
        await until_changed(log, lambda: len(batches(log)) == 1, 20, "the batch in its handler")
        await daemon.kill()  # the handler holds all four items
        assert [r["status"] for r in items(daemon)] == ["running"] * 4
        gate.release()
        await daemon.start()
        (settled,) = await daemon.wait_log("batch_settled", timeout_s=20)
        assert settled["items"] == 4 and settled["failed"] == 0
        stored = items(daemon)
        assert len(stored) == 4  # nothing lost, nothing doubled
        assert [(r["status"], r["attempt"]) for r in stored] == [("succeeded", 2)] * 4
        crashed, rerun = batches(log)
        assert seqs(crashed) == seqs(rerun) == [0, 1, 2, 3]
        for row in stored:
            record = await daemon.get(f"/v1/invocations/{row['id']}")
            attempts = [(a["status"], a["batch_id"]) for a in record["attempts"]]
            assert attempts == [("crashed", crashed["id"]), ("succeeded", rerun["id"])]
    finally:
        gate.release()
        await daemon.close()


async def test_a_drain_that_cuts_a_batch_short_records_it_and_retries_its_items(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    log, gate = shared_folder(tmp_path) / "batches.jsonl", Gate(shared_folder(tmp_path) / "gate")
    body = mqtt_batch_toml(
        mosquitto.url, log, size=3, window_s=5, extra="timeout_s = 60", gate=gate.path
    )
    daemon = Daemon(write_config(tmp_path, body, shutdown_timeout_s=0.5))
    try:
        await daemon.start()
        await subscribed(daemon)
        await publish(mosquitto.port, *messages(0, 3))
        await until_changed(log, lambda: len(batches(log)) == 1, 20, "the batch in its handler")
        await daemon.stop()  # SIGTERM: the drain waits 0.5 s, then cancels the batch
        (cut,) = batches(log)
        stored = items(daemon)
        assert [(r["status"], r["attempt"]) for r in stored] == [("queued", 1)] * 3
        (record,) = rows(daemon, "SELECT * FROM invocations WHERE trigger = 'batch'")
        assert (record["id"], record["error_type"]) == (cut["id"], "Lambdaemon.Interrupted")
        gate.release()
        mark = daemon.log_mark()
        await daemon.start()
        await daemon.wait_log("batch_settled", since=mark, timeout_s=20)
        stored = items(daemon)
        assert [(r["status"], r["attempt"]) for r in stored] == [("succeeded", 2)] * 3
    finally:
        gate.release()
        await daemon.close()


async def test_show_finds_the_batch_of_a_message_and_the_items_of_a_batch(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    log = shared_folder(tmp_path) / "batches.jsonl"
    body = mqtt_batch_toml(mosquitto.url, log, size=3, window_s=5)
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, *messages(0, 2), *messages(2, 3, do="fail"))
        await daemon.wait_log("batch_settled")
        stored = items(daemon)
        batch_id = stored[0]["batch_id"]
        item = await daemon.get(f"/v1/invocations/{stored[0]['id']}")
        assert item["batch_id"] == batch_id
        batch = await daemon.get(f"/v1/invocations/{batch_id}")
        assert batch["trigger"] == "batch" and batch["batch_id"] == batch_id
        assert [(i["invocation_id"], i["status"]) for i in batch["items"]] == [
            (stored[0]["id"], "succeeded"),
            (stored[1]["id"], "succeeded"),
            (stored[2]["id"], "failed"),
        ]
        assert len(batch["event"]["Records"]) == 3
        shown = await asyncio.to_thread(_cli, daemon, "show", stored[2]["id"])
        assert shown.returncode == 0 and batch_id in shown.stdout
        shown = await asyncio.to_thread(_cli, daemon, "show", batch_id)
        assert shown.returncode == 0
        assert all(row["id"] in shown.stdout for row in stored)
        # A batch is not replayed as an event of its own: its items are, one by one.
        assert daemon.session is not None
        url = f"{daemon.base}/v1/invocations/{batch_id}/replay"
        async with daemon.session.post(url, json={}) as resp:
            assert resp.status == 409
            assert "replay its items" in (await resp.json())["error"]


def _cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args, "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


# --- files ---------------------------------------------------------------------------------------


async def test_file_drops_run_in_batches_and_each_file_ends_in_its_own_place(tmp_path: Path):
    inbox, log = tmp_path / "inbox", shared_folder(tmp_path) / "batches.jsonl"
    body = (
        f'[functions.b]\nhandler = "handler.handler"\ncode = "{FUNCS / "batch_record"}"\n'
        f'retries = 0\n[functions.b.env]\nBATCH_LOG = "{log}"\n'
        f'[[functions.b.triggers]]\ntype = "files"\npath = "{inbox}"\n'
        "batch_size = 4\nbatch_window_s = 1.0\n"
    )
    async with running_daemon(tmp_path, body) as daemon:
        await daemon.wait_log("files_rescanned")
        names = [f"{i}.json" for i in range(4)]
        for i, name in enumerate(names):
            payload = {"seq": i, "do": "fail"} if i == 2 else {"seq": i}
            drop(inbox, name, json.dumps(payload).encode(), tmp_path / "staging")
        await daemon.wait_log("files_done", 3, timeout_s=20)
        await daemon.wait_log("files_failed", 1, timeout_s=20)
        (batch,) = batches(log)
        assert sorted(r["name"] for r in batch["records"]) == names
        done, failed = finished(inbox), finished(inbox, "failed")
        assert sorted(done) == ["0.json", "1.json", "3.json"] and list(failed) == ["2.json"]
        # Each file is filed under its own invocation, the id its record carried.
        by_name = {r["name"]: r["messageId"] for r in batch["records"]}
        assert {**done, **failed} == by_name
