"""The files source inside the real daemon: real folders, real inotify, real workers, SIGKILL.

Every wait is bounded and on the daemon's log: files_done and files_failed are logged once the
file is in its final place; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path

from tests.daemon_proc import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    Daemon,
    Gate,
    running_daemon,
    shared_folder,
    write_config,
)
from triggers.base import printable
from triggers.files import SETTLE_S

FUNCS = Path(__file__).resolve().parent / "functions"


def function(name: str, fixture: str, *triggers: str, extra: str = "") -> str:
    """A [functions.NAME] table on a fixture handler plus its files triggers (TOML bodies)."""
    text = f'[functions.{name}]\nhandler = "handler.handler"\ncode = "{FUNCS / fixture}"\n{extra}\n'
    for body in triggers:
        text += f'[[functions.{name}.triggers]]\ntype = "files"\n{body}\n'
    return text


def drop(folder: Path, name: str, data: bytes, staging: Path) -> None:
    """What a careful producer does: write elsewhere on the same filesystem, rename in."""
    staging.mkdir(exist_ok=True)
    (staging / name).write_bytes(data)
    os.rename(staging / name, folder / name)


def finished(folder: Path, kind: str = "done") -> dict[str, str]:
    """{original name: invocation id} of the files in done/ or failed/ (sidecars left out)."""
    if not (folder / kind).is_dir():
        return {}
    out = {}
    for entry in os.listdir(folder / kind):
        if not entry.endswith(".error"):
            prefix, _, name = entry.partition("_")
            out[name] = prefix
    return out


async def records(daemon: Daemon, function: str) -> list[dict]:
    """Full records (event and result included) of every invocation of `function`."""
    rows = await daemon.invocations(function=function)
    return list(await asyncio.gather(*(daemon.get(f"/v1/invocations/{r['id']}") for r in rows)))


def events(daemon: Daemon, kind: str, /, **match) -> list[dict]:
    return [
        e
        for e in daemon.log_events()
        if e.get("event") == kind and all(e.get(k) == v for k, v in match.items())
    ]


async def test_files_many_at_once_each_run_exactly_once(tmp_path):
    inbox = tmp_path / "inbox"
    trigger = f'path = "{inbox}"\npattern = "*.txt"'
    body = function("reader", "files_read", trigger, extra="concurrency = 4")
    async with running_daemon(tmp_path, body) as daemon:
        for i in range(200):
            if i % 2:  # half renamed in (MOVED_TO), half written in place (CLOSE_WRITE)
                drop(inbox, f"f{i:03}.txt", f"file {i}\n".encode() * i, tmp_path / "staging")
            else:
                (inbox / f"f{i:03}.txt").write_bytes(f"file {i}\n".encode() * i)
        await daemon.wait_log("files_done", 200, timeout_s=40)
        rows, done = await records(daemon, "reader"), finished(inbox)
        assert len(rows) == 200
        assert {r["id"] for r in rows} == set(done.values())
        assert all(r["status"] == "succeeded" and r["attempt"] == 1 for r in rows)
        assert sorted(os.listdir(inbox)) == [".processing", "done"]
        assert os.listdir(inbox / ".processing") == []
        for record in rows:
            event, result = record["event"], record["result"]
            assert record["trigger"] == "files" and record["trigger_id"] == "reader#0"
            assert event["path"] == str(inbox / ".processing" / event["name"])
            assert done[event["name"]] == record["id"]
            assert result["size_ok"] and result["sha256_ok"]
            assert event["mtime"].endswith("Z") and len(event["sha256"]) == 64


async def test_files_slow_writer_is_claimed_only_after_close(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    body = function("reader", "files_read", f'path = "{inbox}"\npattern = "*.txt"')
    early = (inbox / "early.txt").open("wb")  # open across the start scan
    early.write(b"early part one, ")
    early.flush()
    async with running_daemon(tmp_path, body) as daemon:
        # /health answers before the sources start: wait for the start scan itself.
        start = await daemon.wait_log("files_rescanned", reason="start")
        assert start[0]["candidates"] == 1 and start[0]["claimed"] == 0
        late = (inbox / "late.txt").open("wb")  # opened while the watch is live
        late.write(b"late part one, ")
        late.flush()
        drop(inbox, "marker.txt", b"x", tmp_path / "staging")
        await daemon.wait_log("files_done", name="marker.txt")
        assert (inbox / "early.txt").exists() and (inbox / "late.txt").exists()
        for file, rest in ((early, b"early part two"), (late, b"late part two")):
            file.write(rest)
            file.close()
        await daemon.wait_log("files_done", name="early.txt")
        await daemon.wait_log("files_done", name="late.txt")
        for name, text in (
            ("early", "early part one, early part two"),
            ("late", "late part one, late part two"),
        ):
            record = await daemon.get(f"/v1/invocations/{finished(inbox)[name + '.txt']}")
            assert record["result"]["text"] == text
            assert (inbox / "done" / f"{record['id']}_{name}.txt").read_text() == text


async def test_files_start_scan_pattern_ignored_names_and_nested_folders(tmp_path):
    everything, texts = tmp_path / "everything", tmp_path / "texts"
    for folder in (everything, texts):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "inner.txt").write_text("nested: never looked at")
        (folder / "dir.txt").mkdir()  # a folder matching the pattern is still a folder
        for name in ("a.txt", "b.jpg", ".hidden.txt", "x.tmp", "y.part", "z.txt~", "c.crdownload"):
            (folder / name).write_text(name)
    body = function(
        "reader",
        "files_read",
        f'path = "{everything}"\npattern = "*"\nrescan_s = 0.2',
        f'path = "{texts}"\npattern = "*.txt"\nrescan_s = 0.2',
    )
    async with running_daemon(tmp_path, body, daemon='log_level = "debug"') as daemon:
        await daemon.wait_logged(lambda: finished(everything).keys() == {"a.txt", "b.jpg"})
        await daemon.wait_logged(lambda: finished(texts).keys() == {"a.txt"})
        await daemon.wait_log("files_rescanned", 4, reason="periodic")
        assert sorted(os.listdir(texts)) == sorted(
            [
                ".processing",
                "done",
                "sub",
                "dir.txt",
                "b.jpg",
                ".hidden.txt",
                "x.tmp",
                "y.part",
                "z.txt~",
                "c.crdownload",
            ]
        )
        assert sorted(os.listdir(everything)) == sorted(
            [
                ".processing",
                "done",
                "sub",
                "dir.txt",
                ".hidden.txt",
                "x.tmp",
                "y.part",
                "z.txt~",
                "c.crdownload",
            ]
        )
        for folder in (everything, texts):
            assert (
                os.listdir(folder / "sub") == ["inner.txt"] and os.listdir(folder / "dir.txt") == []
            )
        rows = await daemon.invocations(function="reader")
        assert sorted(r["trigger_id"] for r in rows) == ["reader#0", "reader#0", "reader#1"]


async def test_files_odd_entries_are_rejected_to_failed_with_reason(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.txt")
    (inbox / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (tmp_path / "outside.txt").write_text("outside the folder")
    (inbox / "link.txt").symlink_to(tmp_path / "outside.txt")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(inbox / "sock.txt"))
    body = function("reader", "files_read", f'path = "{inbox}"\npattern = "*.txt"\nrescan_s = 0.2')
    try:
        async with running_daemon(tmp_path, body) as daemon:
            os.mkfifo(inbox / "later.txt")  # no inotify event for a FIFO: a periodic scan finds it
            drop(inbox, "fine.txt", b"a regular file", tmp_path / "staging")
            odd = {"pipe.txt", "dangling.txt", "link.txt", "sock.txt", "later.txt"}
            await daemon.wait_logged(lambda: finished(inbox, "failed").keys() == odd)
            await daemon.wait_log("files_done", name="fine.txt")
            kinds = {
                "pipe.txt": "fifo",
                "later.txt": "fifo",
                "sock.txt": "socket",
                "dangling.txt": "symlink",
                "link.txt": "symlink",
            }
            rejected = await daemon.wait_log("files_rejected", len(odd))  # once each is moved
            assert {e["name"] for e in rejected} == odd
            ids = {}
            for name, prefix in finished(inbox, "failed").items():
                sidecar = json.loads((inbox / "failed" / f"{prefix}_{name}.error").read_text())
                assert sidecar["reason"] == f"not a regular file ({kinds[name]})"
                assert prefix == f"rejected-{sidecar['invocation_id']}"
                ids[sidecar["invocation_id"]] = name
            assert (tmp_path / "outside.txt").read_text() == "outside the folder"
            # Each is also recorded: a dead letter that never ran, with the reason.
            by_id = {r["id"]: r for r in await records(daemon, "reader")}
            assert {by_id[i]["event"]["name"] for i in ids} == odd
            for i, name in ids.items():
                assert by_id[i]["status"] == "failed" and by_id[i]["attempt"] == 0
                assert by_id[i]["dead_letter_reason"] == "EventRejected"
                assert by_id[i]["error_message"] == f"not a regular file ({kinds[name]})"
            ran = [r["event"]["name"] for r in by_id.values() if r["attempt"]]
            assert ran == ["fine.txt"]
    finally:
        listener.close()


async def test_files_unreadable_file_is_rejected_to_failed_and_the_rest_go_on(tmp_path):
    # Tests run as root, which reads any file; the daemon runs without the capabilities that
    # let it, so mode 000 refuses it the file as it would any other user.
    inbox = tmp_path / "inbox"
    body = function("reader", "files_read", f'path = "{inbox}"\npattern = "*.txt"')
    daemon = Daemon(write_config(tmp_path, body), drop_caps=(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH))
    await daemon.start()
    try:
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "locked.txt").write_bytes(b"nobody may read this")
        (staging / "locked.txt").chmod(0)
        os.rename(staging / "locked.txt", inbox / "locked.txt")
        for i in range(5):
            drop(inbox, f"after{i}.txt", f"file {i}".encode(), staging)
        [line] = await daemon.wait_log("files_rejected", name="locked.txt")
        assert line["reason"] == "cannot read: Permission denied"
        done = await daemon.wait_log("files_done", 5)
        assert sorted(e["name"] for e in done) == [f"after{i}.txt" for i in range(5)]
        invocation_id = line["invocation_id"]
        kept = inbox / "failed" / f"rejected-{invocation_id}_locked.txt"
        assert Path(line["moved_to"]) == kept and kept.read_bytes() == b"nobody may read this"
        sidecar = json.loads((inbox / "failed" / f"{kept.name}.error").read_text())
        assert sidecar["reason"] == line["reason"] and sidecar["status"] == "rejected"
        record = await daemon.get(f"/v1/invocations/{invocation_id}")
        assert (record["status"], record["attempt"]) == ("failed", 0)
        assert record["dead_letter_reason"] == "EventRejected"
        assert record["error_message"] == "cannot read: Permission denied"
        assert record["event"]["name"] == "locked.txt"
        assert os.listdir(inbox / ".processing") == []
    finally:
        await daemon.close()


async def test_files_names_at_the_length_limit_are_finished_with_their_middle_cut(tmp_path):
    # Found by tests/test_fuzz.py: `<invocation_id>_<name>` passed the 255-byte limit on a name,
    # so the move to done/ or failed/ failed for ever and the file stayed in .processing.
    inbox = tmp_path / "inbox"
    done_name = "ü" * 120 + "report.txt"  # 250 bytes: 2-byte characters where the cut falls
    failed_name = "f" * 243 + ".csv"  # 247 bytes; its sidecar adds ".error"
    odd_name = os.fsdecode(b"\xe9" * 240 + b".txt")  # not UTF-8: rejected
    assert len(os.fsencode(done_name)) == 250
    body = function("reader", "files_read", f'path = "{inbox}"\npattern = "*.txt"')
    body += function("breaker", "files_fail", f'path = "{inbox}"\npattern = "*.csv"')
    async with running_daemon(tmp_path, body) as daemon:
        for name in (done_name, failed_name, odd_name, "ok.txt"):
            drop(inbox, name, b"content", tmp_path / "staging")
        done = {e["name"]: e for e in await daemon.wait_log("files_done", 2)}
        await daemon.wait_log("files_failed", name=failed_name)
        await daemon.wait_log("files_rejected", name=printable(odd_name))
        assert done.keys() == {done_name, "ok.txt"}
        assert os.listdir(inbox / ".processing") == []
        long_done = Path(done[done_name]["moved_to"])
        assert long_done.name.startswith(done[done_name]["invocation_id"] + "_üüü")
        assert long_done.name.endswith("ü….txt")  # cut between characters, extension kept
        failed = sorted(os.fsdecode(n) for n in os.listdir(bytes(inbox / "failed")))
        assert [n.rpartition(".")[2] for n in failed] == ["csv", "error", "txt", "error"]
        for sidecar in failed[1::2]:  # each keeps the whole name
            kept = json.loads((inbox / "failed" / sidecar).read_text())["name"]
            assert kept == (odd_name if sidecar.startswith("rejected-") else failed_name)
        record = await daemon.get(f"/v1/invocations/{done[done_name]['invocation_id']}")
        assert record["event"]["name"] == done_name  # and so does the record
        assert not [e for e in daemon.log_events() if e.get("level") == "error"]


async def test_files_failing_handler_goes_to_failed_and_can_be_replayed(tmp_path):
    inbox = tmp_path / "inbox"
    body = function("breaker", "files_fail", f'path = "{inbox}"\npattern = "*.csv"')
    async with running_daemon(tmp_path, body) as daemon:
        drop(inbox, "bad.csv", b"1,2,3\n", tmp_path / "staging")
        await daemon.wait_log("files_failed", name="bad.csv")
        first = finished(inbox, "failed")["bad.csv"]
        sidecar = json.loads((inbox / "failed" / f"{first}_bad.csv.error").read_text())
        assert sidecar["invocation_id"] == first and sidecar["function"] == "breaker"
        assert (sidecar["status"], sidecar["error_type"]) == ("failed", "ValueError")
        assert sidecar["error_message"] == "cannot process bad.csv"
        [failed] = events(daemon, "files_failed", name="bad.csv")
        assert failed["invocation_id"] == first
        # Moving it back in is a replay: a new claim, so a new invocation, not the old one's result.
        os.rename(inbox / "failed" / f"{first}_bad.csv", inbox / "bad.csv")
        await daemon.wait_log("files_failed", 2, name="bad.csv")
        rows = await daemon.invocations(function="breaker")
        assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
        assert finished(inbox, "failed")["bad.csv"] in {r["id"] for r in rows} - {first}


async def test_files_after_delete_removes_successes_and_keeps_failures(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    body = function("reader", "files_read", f'path = "{good}"\nafter = "delete"') + function(
        "breaker", "files_fail", f'path = "{bad}"\nafter = "delete"'
    )
    async with running_daemon(tmp_path, body) as daemon:
        drop(good, "ok.bin", b"\x00\x01", tmp_path / "staging")
        drop(bad, "ko.bin", b"\x02", tmp_path / "staging")
        await daemon.wait_log("files_done", name="ok.bin")
        await daemon.wait_log("files_failed", name="ko.bin")
        assert sorted(os.listdir(good)) == [".processing"]
        assert os.listdir(good / ".processing") == []
        kept = bad / "failed" / f"{finished(bad, 'failed')['ko.bin']}_ko.bin"
        assert kept.read_bytes() == b"\x02"
        (row,) = await daemon.invocations(function="reader")
        assert row["status"] == "succeeded" and events(daemon, "files_done")[0]["moved_to"] is None


async def test_files_namesake_waits_for_the_one_in_flight(tmp_path):
    inbox, block = tmp_path / "inbox", Gate(shared_folder(tmp_path) / "block")
    body = function(
        "holder",
        "files_block",
        f'path = "{inbox}"',
        extra=f'concurrency = 2\ntimeout_s = 60\nenv = {{ BLOCK_FILE = "{block.path}" }}',
    )
    async with running_daemon(tmp_path, body) as daemon:
        drop(inbox, "same.txt", b"first", tmp_path / "staging")
        await daemon.wait_log("files_claimed", name="same.txt")  # in .processing/, committed
        drop(inbox, "same.txt", b"second!", tmp_path / "staging")
        await daemon.wait_log("files_deferred", name="same.txt")
        assert (inbox / ".processing" / "same.txt").read_bytes() == b"first"
        block.release()
        await daemon.wait_log("files_done", 2, name="same.txt")
        assert {r["result"]["size"] for r in await records(daemon, "holder")} == {5, 7}


async def test_files_sigkill_mid_invocation_finishes_after_restart_with_one_invocation(tmp_path):
    inbox, block = tmp_path / "inbox", Gate(shared_folder(tmp_path) / "block")
    body = function(
        "holder",
        "files_block",
        f'path = "{inbox}"\npattern = "*.txt"',
        extra=f'timeout_s = 60\nenv = {{ BLOCK_FILE = "{block.path}" }}',
    )
    daemon = Daemon(write_config(tmp_path, body))
    try:
        await daemon.start()
        drop(inbox, "killed.txt", b"in flight at the kill", tmp_path / "staging")
        await daemon.wait_log("invocation_started", function="holder")  # marked running first
        rows = await daemon.invocations(status="running")
        await daemon.kill()
        assert (inbox / ".processing" / "killed.txt").exists()
        # While it is down: one file is dropped, one looks claimed but was never committed.
        drop(inbox, "while_down.txt", b"dropped during downtime", tmp_path / "staging")
        (inbox / ".processing" / "uncommitted.txt").write_bytes(b"renamed, then the power went")
        block.release()
        await daemon.start()
        names = {"killed.txt", "while_down.txt", "uncommitted.txt"}
        await daemon.wait_logged(lambda: finished(inbox).keys() == names)
        after = await records(daemon, "holder")
        assert sorted(r["event"]["name"] for r in after) == sorted(names)  # one each, no twin
        assert finished(inbox)["killed.txt"] == rows[0]["id"]  # the same invocation, carried on
        assert all(r["status"] == "succeeded" for r in after)
        assert os.listdir(inbox / ".processing") == []
        assert events(daemon, "files_claimed", name="killed.txt", created=False)
    finally:
        await daemon.close()


async def test_files_poll_mode_waits_for_stable_files(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    body = function("reader", "files_read", f'path = "{inbox}"\npoll = true\nrescan_s = 0.2')
    async with running_daemon(tmp_path, body) as daemon:
        writer = (inbox / "growing.txt").open("wb")
        writer.write(b"begun")
        writer.flush()
        dropped = time.time()
        drop(inbox, "still.txt", b"complete", tmp_path / "staging")
        await daemon.wait_log("files_done", name="still.txt")
        claimed = events(daemon, "files_claimed", name="still.txt")[0]["timestamp"]
        # No inotify here: only two looks at least SETTLE_S apart let a scanned file in.
        assert datetime.fromisoformat(claimed).timestamp() - dropped >= SETTLE_S
        assert (inbox / "growing.txt").exists()  # stable for longer than still.txt, but open
        writer.write(b" and ended")
        writer.close()
        await daemon.wait_log("files_done", name="growing.txt")
        done = inbox / "done" / f"{finished(inbox)['growing.txt']}_growing.txt"
        assert done.read_bytes() == b"begun and ended"


async def test_files_folder_removed_while_running_is_recreated_and_watched_again(tmp_path):
    inbox = tmp_path / "inbox"
    # Plain: a warm sandboxed worker shows the folder (a bind mount of it), which keeps the
    # removed folder's inode, and its IGNORED, until that worker ends (docs/sandbox.md).
    body = function("reader", "files_read", f'path = "{inbox}"', extra="sandbox = false")
    async with running_daemon(tmp_path, body) as daemon:
        drop(inbox, "before.txt", b"1", tmp_path / "staging")
        await daemon.wait_log("files_done", name="before.txt")
        shutil.rmtree(inbox)  # the watch dies with the folder (IGNORED)
        await daemon.wait_log("files_rescanned", reason="rewatch")
        drop(inbox, "after.txt", b"2", tmp_path / "staging")
        await daemon.wait_log("files_done", name="after.txt")


async def test_files_s3_format_is_parsed_by_powertools_and_the_file_is_readable(tmp_path):
    inbox = tmp_path / "uploads"
    trigger = f'path = "{inbox}"\nevent_format = "s3"'
    body = function("s3fn", "files_s3", trigger, extra="memory_mb = 1024")
    names = ["red flower.txt", "a+b&c=d%.txt", "plain.txt"]
    async with running_daemon(tmp_path, body) as daemon:
        for name in names:
            drop(inbox, name, f"content of {name}\n".encode(), tmp_path / "staging")
            await daemon.wait_log("files_done", names.index(name) + 1, timeout_s=30)
        rows = await records(daemon, "s3fn")
    assert [r["status"] for r in rows] == ["succeeded"] * 3, rows
    by_key = {r["result"]["key"]: r for r in rows}
    assert sorted(by_key) == sorted(names)
    raw = {name: by_key[name]["result"]["raw_key"] for name in names}
    assert raw == {
        "red flower.txt": "red+flower.txt",
        "a+b&c=d%.txt": "a%2Bb%26c%3Dd%25.txt",
        "plain.txt": "plain.txt",
    }
    for name, row in by_key.items():
        result, [record] = row["result"], row["event"]["Records"]
        assert result["text"] == f"content of {name}\n"
        assert result["size_ok"] and result["etag_ok"]
        assert result["bucket"] == result["model_bucket"] == "uploads"
        assert result["model_key"] == name and result["event_name"] == "ObjectCreated:Put"
        assert result["region"] == "us-east-1" and result["configuration_id"] == "s3fn#0"
        assert record["eventVersion"] == "2.1" and record["eventSource"] == "aws:s3"
        assert record["s3"]["bucket"]["arn"] == "arn:aws:s3:::uploads"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["eventTime"])
        assert datetime.fromisoformat(result["model_time"]).utcoffset() == timedelta(0)
        assert record["lambdaemon"]["path"] == str(inbox / ".processing" / name)
        assert re.fullmatch(r"[0-9A-F]{16,}", result["sequencer"])
    sequencers = [by_key[name]["result"]["sequencer"] for name in names]  # dropped in this order
    assert sorted(sequencers, key=lambda s: (len(s), s)) == sequencers and len(set(sequencers)) == 3
