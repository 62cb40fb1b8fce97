"""One input a source cannot turn into an event affects only itself: it is recorded as a
rejected invocation (failed, dead-lettered `EventRejected`, never run) with its raw bytes and
the reason, acknowledged, and the inputs behind it are served as usual. Real daemon, real
Mosquitto, real folders."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from daemon.dispatcher import Dispatcher
from daemon.pool import WorkerPool
from daemon.store.sqlite import Store
from daemon.untrusted import MAX_JSON_DEPTH
from tests.daemon_proc import Daemon, running_daemon
from tests.mosquitto import Mosquitto
from tests.triggers.test_mqtt import count, events, mqtt_toml, publish, stored, subscribed
from triggers.base import MAX_REJECTED_RAW_BYTES, Accepted, emit_built

FUNCS = Path(__file__).resolve().parent / "functions"
DEEP = b"[" * 1000 + b"]" * 1000  # msgspec raises RecursionError on this
UNCLOSED = b"{" * 5000  # not JSON at all, but a decoder would recurse before it found out


async def rejected(daemon: Daemon, n: int) -> list[dict[str, Any]]:
    """The `n` dead letters the daemon logged as rejected inputs, as the admin API shows them."""
    lines = await daemon.wait_log("event_rejected", n)
    return [await daemon.get(f"/v1/invocations/{line['invocation_id']}") for line in lines]


async def test_mqtt_poison_messages_are_recorded_rejected_and_the_stream_goes_on(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = mqtt_toml(mosquitto.url, {"temp": [("sensors/+/temp", 1)]})
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, ("sensors/bad/temp", DEEP), ("sensors/worse/temp", UNCLOSED))
        await publish(mosquitto.port, *(("sensors/a/temp", f'{{"n": {i}}}') for i in range(50)))
        await stored(daemon, lambda: count(daemon) >= 52, "52 records")
        await daemon.wait_log("invocation_finished", 50, function="temp", status="succeeded")

        deep, unclosed = await rejected(daemon, 2)
        for record, topic, raw in ((deep, "bad", DEEP), (unclosed, "worse", UNCLOSED)):
            assert record["status"] == "failed" and record["attempt"] == 0
            assert record["dead_letter_reason"] == "EventRejected"
            assert record["error_type"] == "EventRejected"
            assert f"deeper than {MAX_JSON_DEPTH} levels" in record["error_message"]
            event = record["event"]
            assert event["topic"] == f"sensors/{topic}/temp" and event["qos"] == 1
            assert base64.b64decode(event["raw"]) == raw and event["raw_bytes"] == len(raw)
            assert event["raw_truncated"] is False
        dead = (await daemon.get("/v1/dead-letters"))["dead_letters"]
        assert {d["id"] for d in dead} == {deep["id"], unclosed["id"]}

        # Acked once: never redelivered, the connection never dropped, nothing ran them.
        assert count(daemon) == 52
        assert len(events(daemon, "mqtt_connected")) == 1
        assert events(daemon, "mqtt_disconnected") == []
        assert len(events(daemon, "invocation_started")) == 50


async def test_files_bad_names_and_entries_are_rejected_alone_among_good_files(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bad_name = os.fsdecode(b"caf\xe9.txt")  # Latin-1 bytes: not a UTF-8 name
    body = (
        f'[functions.reader]\nhandler = "handler.handler"\ncode = "{FUNCS / "files_read"}"\n'
        f'[[functions.reader.triggers]]\ntype = "files"\npath = "{inbox}"\npattern = "*.txt"\n'
        "rescan_s = 0.2\n"
    )
    async with running_daemon(tmp_path, body) as daemon:
        (inbox / bad_name).write_bytes(b"content of a badly named file")
        os.mkfifo(inbox / "pipe.txt")
        for i in range(20):
            (inbox / f"good{i:02}.txt").write_bytes(f"file {i}".encode())
        await daemon.wait_log("files_done", 20)
        lines = await daemon.wait_log("files_rejected", 2)

        reasons = {line["name"]: line["reason"] for line in lines}
        assert reasons == {
            "caf\\udce9.txt": "the file name is not valid UTF-8 (caf\\udce9.txt)",
            "pipe.txt": "not a regular file (fifo)",
        }
        failed = sorted(os.listdir(inbox / "failed"))
        assert len(failed) == 4  # each file and its .error sidecar
        kept = next(n for n in failed if n.endswith("_" + bad_name))
        assert (inbox / "failed" / kept).read_bytes() == b"content of a badly named file"
        assert len(os.listdir(inbox / "done")) == 20 and os.listdir(inbox / ".processing") == []

        records = await rejected(daemon, 2)
        by_name = {r["event"]["name"]: r for r in records}
        assert by_name.keys() == {"caf\\udce9.txt", "pipe.txt"}
        record = by_name["caf\\udce9.txt"]
        assert base64.b64decode(record["event"]["raw"]) == b"caf\xe9.txt"
        assert record["error_message"] == reasons["caf\\udce9.txt"]
        assert record["status"] == "failed" and record["dead_letter_reason"] == "EventRejected"
        assert daemon.log_events() and not [
            e for e in daemon.log_events() if e.get("event") == "files_processing_failed"
        ]


async def test_a_rejected_input_is_committed_once_per_dedupe_key_and_marks_its_cron_fire(
    tmp_path: Path,
) -> None:
    async with Store.open(tmp_path / "lambdaemon.db") as store:
        dispatcher = Dispatcher(store, WorkerPool(1), {})

        def bad_event() -> Any:
            return {"text": os.fsdecode(b"\xff")}  # a lone surrogate: not JSON text

        async def fire() -> Accepted:
            return await emit_built(
                dispatcher,
                "report",
                bad_event,
                raw=lambda: b"\x00" * (MAX_REJECTED_RAW_BYTES + 10),
                trigger="cron",
                trigger_id="report#0",
                dedupe_key="cron:report#0@2025-06-01T12:00:00Z",
                cron_fire=("report#0", "2025-06-01T12:00:00Z"),
                details=lambda: {"nominal": "2025-06-01T12:00:00Z"},
            )

        first, again = await fire(), await fire()
        assert first.created and not again.created
        assert again.invocation_id == first.invocation_id
        assert await store.last_cron_fire("report#0") == "2025-06-01T12:00:00Z"

        record = await store.get(first.invocation_id)
        assert record is not None
        assert (record["status"], record["attempt"]) == ("failed", 0)
        assert record["dead_letter_reason"] == record["error_type"] == "EventRejected"
        assert record["error_message"].startswith("cannot build the event: ")
        event = json.loads(record["event"])
        assert event["nominal"] == "2025-06-01T12:00:00Z"
        assert len(base64.b64decode(event["raw"])) == MAX_REJECTED_RAW_BYTES
        assert event["raw_bytes"] == MAX_REJECTED_RAW_BYTES + 10 and event["raw_truncated"]
        assert json.loads(record["result"])["errorType"] == "EventRejected"
        dead = await store.list_dead_letters()
        assert [d["id"] for d in dead] == [first.invocation_id]
