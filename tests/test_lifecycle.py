"""The daemon as a systemd service: graceful shutdown, reload, /health and sd_notify.

Every test runs the real daemon as a subprocess and reads its records straight from its SQLite
file (read-only), so they can be checked while it is down. Every wait is bounded, and on what the
daemon logs (Daemon.wait_log), sd_notify or the store's barrier; one polls (said where).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.daemon_proc import ROOT, Daemon, free_port, shared_folder, until, write_config
from tests.mosquitto import running_broker
from tests.triggers.test_mqtt import publish

FUNCS = ROOT / "tests" / "functions"
BASIC = ROOT / "tests" / "pool" / "functions" / "basic"
RECORD = ROOT / "tests" / "triggers" / "functions" / "mqtt_record"
INTERRUPTED = "Lambdaemon.Interrupted"


# --- helpers -----------------------------------------------------------------------------------


def fn_toml(name: str, code: Path, handler: str = "handler.handler", **settings: Any) -> str:
    lines = [f"[functions.{name}]", f'handler = "{handler}"', f'code = "{code}"']
    for key, value in settings.items():
        if isinstance(value, dict):  # a TOML inline table
            value = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
        else:
            value = json.dumps(value)
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def records(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """Every invocation row by id, read from the daemon's database file."""
    db = daemon.config.parent / "var" / "lambdaemon.db"
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM invocations").fetchall()
        attempts = conn.execute("SELECT * FROM attempts ORDER BY attempt").fetchall()
    finally:
        conn.close()
    out = {row["id"]: dict(row, attempts=[]) for row in rows}
    for attempt in attempts:
        out[attempt["invocation_id"]]["attempts"].append(dict(attempt))
    return out


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


async def queue(daemon: Daemon, name: str, event: dict[str, Any]) -> str:
    status, headers, _ = await daemon.invoke(name, event, kind="Event")
    assert status == 202
    return headers["x-amzn-RequestId"]


def status_is(daemon: Daemon, invocation_id: str, status: str) -> Callable[[], bool]:
    return lambda: records(daemon).get(invocation_id, {}).get("status") == status


async def running(daemon: Daemon, invocation_id: str) -> None:
    """Until the invocation's attempt runs (its row is marked running before that is logged)."""
    await daemon.wait_log("invocation_started", invocation_id=invocation_id)


async def health(daemon: Daemon) -> tuple[int, dict[str, Any]] | None:
    """(status, body) of GET /health, or None while nothing listens."""
    assert daemon.session is not None
    try:
        async with daemon.session.get(f"{daemon.base}/health") as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientConnectionError:
        return None


async def run_cli(daemon: Daemon, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.cli",
        *args,
        "--config",
        str(daemon.config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- graceful shutdown -------------------------------------------------------------------------


async def test_sigterm_finishes_in_flight_work_and_leaves_queued_rows_queued(tmp_path: Path):
    slow = fn_toml("slow", FUNCS / "slow", timeout_s=10, concurrency=1)
    daemon = Daemon(write_config(tmp_path, slow))
    await daemon.start()
    try:
        ids = [await queue(daemon, "slow", {"sleep_s": 2 if n == 0 else 0.2}) for n in range(3)]
        await running(daemon, ids[0])
        await daemon.signal(signal.SIGTERM)

        # While it drains: /health says so, nothing new starts, an accepted event is kept.
        await daemon.wait_log("daemon_stopping")  # logged once /health says draining
        draining = await _unhealthy(daemon)
        assert draining == (503, {"status": "draining", "reason": draining[1]["reason"]})
        status, headers, _ = await daemon.invoke("slow", {"sleep_s": 0})
        assert status == 503 and headers["x-amzn-ErrorType"] == "ServiceException"
        late = await queue(daemon, "slow", {"n": "late"})
        assert await daemon.wait(20) == 0
    finally:
        await daemon.close()

    rows = records(daemon)
    assert (rows[ids[0]]["status"], rows[ids[0]]["attempt"]) == ("succeeded", 1)
    for queued in (*ids[1:], late):
        assert (rows[queued]["status"], rows[queued]["attempt"]) == ("queued", 0)
    assert not events(daemon, "dispatcher_drain_cancelled")
    [draining_event] = events(daemon, "dispatcher_draining")
    assert draining_event["in_flight"] == 1

    await daemon.start()  # the next start runs what was left queued
    try:
        await daemon.wait_stored(
            lambda: all(status_is(daemon, i, "succeeded")() for i in (*ids, late)),
            timeout_s=20,
            what="the queued rows to run after the restart",
        )
    finally:
        await daemon.close()


async def _unhealthy(daemon: Daemon) -> tuple[int, dict[str, Any]] | None:
    answer = await health(daemon)
    return answer if answer is not None and answer[0] == 503 else None


async def test_sigterm_past_the_shutdown_timeout_records_interrupted_attempts(tmp_path: Path):
    calls = shared_folder(tmp_path) / "calls"
    body = fn_toml(
        "flaky", FUNCS / "flaky", timeout_s=30, retries=2, retry_backoff_s=[1, 1]
    ) + fn_toml("slow", FUNCS / "slow", timeout_s=30)
    daemon = Daemon(write_config(tmp_path, body, shutdown_timeout_s=1))
    await daemon.start()
    try:
        async_id = await queue(daemon, "flaky", {"dir": str(calls), "fail": ["hang"]})
        sync_call = asyncio.create_task(daemon.invoke("slow", {"sleep_s": 25}))
        await running(daemon, async_id)
        # Polled: a sync call's running row is written VISIBLE_AFTER_S in, and nothing logs it.
        await until(
            lambda: [
                r
                for r in records(daemon).values()
                if r["function"] == "slow" and r["status"] == "running"
            ],
            what="the sync one running",
        )
        started = time.monotonic()
        await daemon.signal(signal.SIGTERM)
        assert await daemon.wait(15) == 0
        assert time.monotonic() - started < 8  # 1 s of drain, not the handlers' 25 s or 60 s
        status, headers, answer = await sync_call
    finally:
        await daemon.close()

    # The sync caller hears why, and its record says so too.
    assert status == 200 and headers["X-Amz-Function-Error"] == "Unhandled"
    assert json.loads(answer)["errorType"] == INTERRUPTED
    rows = records(daemon)
    [sync_row] = [r for r in rows.values() if r["function"] == "slow"]
    assert (sync_row["status"], sync_row["error_type"]) == ("crashed", INTERRUPTED)
    # The async attempt is recorded as interrupted and re-queued by the retry policy.
    row = rows[async_id]
    assert (row["status"], row["attempt"], row["error_type"]) == ("queued", 1, INTERRUPTED)
    assert row["next_attempt_at"] is not None and row["recoveries"] == 0
    assert [(a["attempt"], a["status"]) for a in row["attempts"]] == [(1, "crashed")]
    [cancelled] = events(daemon, "dispatcher_drain_cancelled")
    assert cancelled["cancelled"] == 2
    assert len(events(daemon, "invocation_interrupted")) == 2

    await daemon.start()  # its retry runs after the restart, and succeeds
    try:
        await daemon.wait_stored(status_is(daemon, async_id, "succeeded"), 20, "the retry")
    finally:
        await daemon.close()
    row = records(daemon)[async_id]
    assert [(a["attempt"], a["status"], a["error_type"]) for a in row["attempts"]] == [
        (1, "crashed", INTERRUPTED),
        (2, "succeeded", None),
    ]


async def test_a_second_sigterm_skips_the_drain(tmp_path: Path):
    daemon = Daemon(
        write_config(tmp_path, fn_toml("slow", FUNCS / "slow", timeout_s=60), shutdown_timeout_s=60)
    )
    await daemon.start()
    try:
        invocation_id = await queue(daemon, "slow", {"sleep_s": 50})
        await running(daemon, invocation_id)
        await daemon.signal(signal.SIGTERM)
        await daemon.wait_log("dispatcher_draining")
        started = time.monotonic()
        await daemon.signal(signal.SIGTERM)
        assert await daemon.wait(10) == 0
        assert time.monotonic() - started < 5
    finally:
        await daemon.close()
    assert events(daemon, "drain_skipped")
    assert events(daemon, "dispatcher_drain_cancelled")[0]["cancelled"] == 1
    row = records(daemon)[invocation_id]
    assert (row["status"], row["error_type"]) == ("queued", INTERRUPTED)


# --- reload ------------------------------------------------------------------------------------


async def test_sighup_swaps_functions_without_dropping_queued_or_in_flight_work(tmp_path: Path):
    def config(greeting: str, slow_timeout_s: float, *, gone: bool, added: bool) -> str:
        body = fn_toml("env", BASIC, "handler.environment", env={"GREETING": greeting})
        body += fn_toml("slow", FUNCS / "slow", timeout_s=slow_timeout_s, concurrency=1)
        if gone:
            body += fn_toml("gone", FUNCS / "slow", timeout_s=10, concurrency=1)
        if added:
            body += fn_toml("added", FUNCS / "echo")
        return body

    path = write_config(tmp_path, config("a", 10, gone=True, added=False))
    daemon = Daemon(path)
    await daemon.start()
    try:
        before = json.loads((await daemon.invoke("env"))[2])
        # The first of each is in flight across the reload, the others wait in the backlog.
        slow_ids = [
            await queue(daemon, "slow", {"sleep_s": 1 if n == 0 else 0.2}) for n in range(3)
        ]
        gone_ids = [
            await queue(daemon, "gone", {"sleep_s": 1 if n == 0 else 0.2}) for n in range(3)
        ]
        await running(daemon, slow_ids[0])
        await running(daemon, gone_ids[0])

        write_config(tmp_path, config("b", 11, gone=False, added=True), api_port=daemon.api_port)
        await daemon.signal(signal.SIGHUP)
        [reloaded] = await daemon.wait_log("config_reloaded")
        assert reloaded["functions_changed"] == ["env", "slow"]
        assert (reloaded["functions_added"], reloaded["functions_removed"]) == (["added"], ["gone"])
        assert reloaded["needs_restart"] == [] and reloaded["sources_restarted"] == []

        after = json.loads((await daemon.invoke("env"))[2])  # a new worker, new settings
        assert (before["env"]["GREETING"], after["env"]["GREETING"]) == ("a", "b")
        assert (await daemon.invoke("added", {"hi": 1}))[0] == 200
        assert (await daemon.invoke("gone", {}))[0] == 404
        # Nothing of slow is dropped: in-flight, queued before and after the reload all run.
        slow_ids.append(await queue(daemon, "slow", {"n": "after"}))
        await daemon.wait_stored(
            lambda: all(status_is(daemon, i, "succeeded")() for i in slow_ids),
            timeout_s=20,
            what="every slow invocation",
        )
        # gone's in-flight one finishes; what had not started stays queued in the store.
        await daemon.wait_stored(
            lambda: not [i for i in gone_ids if status_is(daemon, i, "running")()],
            what="gone's in-flight invocation to finish",
        )
        statuses = [records(daemon)[i]["status"] for i in gone_ids]
        assert "queued" in statuses and set(statuses) <= {"succeeded", "queued"}

        # Configured again, the function resumes its queued rows.
        write_config(tmp_path, config("b", 11, gone=True, added=True), api_port=daemon.api_port)
        await daemon.signal(signal.SIGHUP)
        await daemon.wait_log("config_reloaded", 2)
        assert events(daemon, "config_reloaded")[1]["functions_added"] == ["gone"]
        await daemon.wait_stored(
            lambda: all(status_is(daemon, i, "succeeded")() for i in gone_ids),
            timeout_s=20,
            what="gone's queued rows",
        )
    finally:
        await daemon.close()
    assert after["env"]["AWS_LAMBDA_FUNCTION_NAME"] == "env"
    assert before["env"] != after["env"]


async def test_reload_refuses_an_invalid_config_and_reports_restart_only_settings(
    tmp_path: Path,
):
    echo = fn_toml("echo", FUNCS / "echo")
    daemon = Daemon(write_config(tmp_path, echo))
    await daemon.start()
    try:
        broken = echo.replace('handler = "handler.handler"', 'handler = "nope.handler"')
        write_config(tmp_path, broken, api_port=daemon.api_port)
        code, out, err = await run_cli(daemon, "reload")
        assert code == 78, (out, err)
        assert "reload refused" in err and "functions.echo.handler" in err and "nope" in err
        [refused] = events(daemon, "config_reload_refused")
        assert "functions.echo.handler" in refused["reason"]
        assert (await daemon.invoke("echo", {"still": "old"}))[0] == 200  # the old one runs
        assert (await health(daemon)) is not None and (await health(daemon))[0] == 200

        # A setting that cannot change live is reported, not silently ignored.
        write_config(
            tmp_path,
            echo + fn_toml("more", FUNCS / "echo"),
            api_port=daemon.api_port,
            daemon="max_workers = 3",
        )
        code, out, err = await run_cli(daemon, "reload", "--json")
        assert code == 0, (out, err)
        report = json.loads(out)
        assert report["reloaded"] is True and report["functions_added"] == ["more"]
        assert report["needs_restart"] == ["daemon.max_workers"]
        assert events(daemon, "config_needs_restart")[0]["settings"] == ["daemon.max_workers"]
        assert (await daemon.invoke("more", {}))[0] == 200
    finally:
        await daemon.close()


async def test_reload_restarts_only_the_sources_whose_config_changed(tmp_path: Path):
    hook_port, new_port = free_port(), free_port()

    def config(topic: str, path: str, port: int) -> str:
        return (
            f'[mqtt]\nurl = "{broker.url}"\nclient_id = "lifecycle-test"\n'
            f'[webhooks]\nlisten = "127.0.0.1:{port}"\n'
            + fn_toml("rec", RECORD)
            + f'[[functions.rec.triggers]]\ntype = "mqtt"\ntopic = "{topic}"\n'
            + fn_toml("hook", FUNCS / "echo")
            + f'[[functions.hook.triggers]]\ntype = "webhook"\npath = "{path}"\n'
        )

    async def post(port: int, path: str) -> int:
        assert daemon.session is not None
        async with daemon.session.post(f"http://127.0.0.1:{port}{path}", json={}) as resp:
            return resp.status

    def mqtt_rows(topic: str) -> list[dict[str, Any]]:
        return [
            r
            for r in records(daemon).values()
            if r["function"] == "rec"
            and r["status"] == "succeeded"
            and json.loads(r["event"])["topic"] == topic
        ]

    with running_broker(tmp_path / "broker") as broker:
        daemon = Daemon(write_config(tmp_path, config("a/#", "/one", hook_port)))
        await daemon.start()
        try:
            assert len(events(daemon, "mqtt_subscribed")) == 1  # ready means subscribed

            # New webhook routes: swapped in place on the same socket; MQTT untouched.
            write_config(tmp_path, config("a/#", "/two", hook_port), api_port=daemon.api_port)
            code, out, err = await run_cli(daemon, "reload", "--json")
            assert code == 0, err
            assert json.loads(out)["sources_updated"] == ["webhook"]
            assert (await post(hook_port, "/one"), await post(hook_port, "/two")) == (404, 200)
            assert len(events(daemon, "webhook_listening")) == 1
            assert not events(daemon, "trigger_source_stopped")
            await publish(broker.port, ("a/x", b"1"))
            await daemon.wait_stored(
                lambda: mqtt_rows("a/x"), what="a message on the untouched session"
            )

            # A new topic: MQTT reconnects (its session kept); the webhook listener stays.
            write_config(tmp_path, config("b/#", "/two", hook_port), api_port=daemon.api_port)
            code, out, err = await run_cli(daemon, "reload", "--json")
            assert code == 0, err
            assert json.loads(out)["sources_restarted"] == ["mqtt"]
            assert [e["source"] for e in events(daemon, "trigger_source_stopped")] == ["mqtt"]
            assert events(daemon, "mqtt_connected")[-1]["session_present"] is True
            await publish(broker.port, ("b/y", b"2"))
            await daemon.wait_stored(lambda: mqtt_rows("b/y"), what="a message on the new topic")
            assert len(events(daemon, "webhook_listening")) == 1

            # A new address: only now does the webhook listener rebind.
            write_config(tmp_path, config("b/#", "/two", new_port), api_port=daemon.api_port)
            code, out, err = await run_cli(daemon, "reload", "--json")
            assert code == 0, err
            assert json.loads(out)["sources_restarted"] == ["webhook"]
            assert await post(new_port, "/two") == 200
            assert [e["port"] for e in events(daemon, "webhook_listening")] == [hook_port, new_port]
            assert len(events(daemon, "mqtt_connected")) == 2
        finally:
            await daemon.close()


# --- /health and sd_notify ---------------------------------------------------------------------


async def test_health_is_503_until_the_trigger_sources_have_started(tmp_path: Path):
    # A "broker" that accepts and does not answer: the MQTT source's first attempt waits until
    # the test has it refuse the connection.
    connected = asyncio.Event()
    peers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = (
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n'
        + fn_toml("rec", RECORD)
        + '[[functions.rec.triggers]]\ntype = "mqtt"\ntopic = "a/#"\n'
    )
    daemon = Daemon(write_config(tmp_path, body))
    try:
        await daemon.spawn()
        async with asyncio.timeout(10):
            await connected.wait()
        await daemon.wait_log("listener_started", key="api.listen")
        starting = await health(daemon)
        assert starting[0] == 503 and starting[1]["status"] == "starting"
        assert not events(daemon, "daemon_ready")

        for writer in peers:  # CONNACK "not authorized": it fails, retried in the background
            writer.write(b"\x20\x03\x00\x87\x00")
        await daemon.wait_log("daemon_ready")  # logged once /health says ok
        assert await _healthy(daemon)
        names = [e["event"] for e in daemon.log_events()]
        assert names.index("mqtt_disconnected") < names.index("daemon_ready")
    finally:
        await daemon.close()
        for writer in peers:
            writer.close()
        server.close()
        await server.wait_closed()


async def _healthy(daemon: Daemon) -> bool:
    answer = await health(daemon)
    return answer is not None and answer[0] == 200


async def test_sd_notify_ready_after_recovery_stopping_reloading_and_watchdog(tmp_path: Path):
    slow = fn_toml("slow", FUNCS / "slow", timeout_s=10, concurrency=1)
    env = fn_toml("env", BASIC, "handler.environment")
    daemon = Daemon(write_config(tmp_path, slow + env))
    await daemon.start()  # first run, without systemd: leave two rows queued
    try:
        ids = [await queue(daemon, "slow", {"sleep_s": 0.5, "n": n}) for n in range(3)]
        await running(daemon, ids[0])
        await daemon.signal(signal.SIGTERM)
        assert await daemon.wait(20) == 0
    finally:
        await daemon.close()
    assert [records(daemon)[i]["status"] for i in ids[1:]] == ["queued", "queued"]

    name = f"lambdaemon-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(f"\0{name}")  # abstract: no path length limit, nothing to clean up
        sock.setblocking(False)
        messages: asyncio.Queue[str] = asyncio.Queue()
        receiver = asyncio.create_task(_receive(sock, messages))
        daemon.env = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "200000"}
        try:
            await daemon.spawn()
            ready = await _next(messages)
            assert ready.startswith("READY=1\n")  # the first word to systemd
            # Sent only once recovery had resumed the queued rows and the daemon was ready.
            assert events(daemon, "dispatcher_recovered")[-1]["resumed"] == 2
            assert len(events(daemon, "daemon_ready")) == 2
            assert await _healthy(daemon)
            await daemon.wait_stored(
                lambda: all(status_is(daemon, i, "succeeded")() for i in ids),
                what="the resumed rows",
            )

            assert [await _next(messages) for _ in range(2)] == ["WATCHDOG=1"] * 2
            worker_env = json.loads((await daemon.invoke("env"))[2])["env"]
            assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & worker_env.keys()

            await daemon.signal(signal.SIGHUP)
            reloading = await _next(messages, skip_watchdog=True)
            assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert (await _next(messages, skip_watchdog=True)).startswith("READY=1\n")

            await daemon.signal(signal.SIGTERM)
            assert (await _next(messages, skip_watchdog=True)).startswith("STOPPING=1\n")
            assert await daemon.wait(20) == 0
        finally:
            receiver.cancel()
            await daemon.close()


async def _receive(sock: socket.socket, messages: asyncio.Queue[str]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        messages.put_nowait((await loop.sock_recv(sock, 4096)).decode())


async def _next(messages: asyncio.Queue[str], *, skip_watchdog: bool = False) -> str:
    async with asyncio.timeout(20):
        while True:
            message = await messages.get()
            if not (skip_watchdog and message == "WATCHDOG=1"):
                return message
