"""The MQTT source against a real Mosquitto: mostly inside the real daemon (a subprocess).

Records are read straight from the daemon's SQLite file (read-only), so they can be counted
while the daemon is down or after a SIGKILL; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import capture_logs

from daemon.config import load_config
from daemon.dispatcher import Dispatcher
from daemon.errors import ConfigError
from daemon.pool import WorkerPool
from daemon.store import Store
from tests.daemon_proc import Daemon, write_config
from tests.mosquitto import Mosquitto, free_port
from triggers.base import supervise
from triggers.mqtt import MqttSource

RECORD = Path(__file__).resolve().parent / "functions" / "mqtt_record"
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --- helpers -----------------------------------------------------------------------------------


def mqtt_toml(url: str, triggers: dict[str, list[tuple[str, int]]], extra: str = "") -> str:
    """An [mqtt] section and one mqtt_record function per entry: name -> [(topic, qos)]."""
    out = f'[mqtt]\nurl = "{url}"\nclient_id = "lambdaemon-test"\n{extra}\n'
    for name, topics in triggers.items():
        out += f'[functions.{name}]\nhandler = "handler.handler"\ncode = "{RECORD}"\n'
        for topic, qos in topics:
            out += f'[[functions.{name}.triggers]]\ntype = "mqtt"\ntopic = "{topic}"\nqos = {qos}\n'
    return out


def records(daemon: Daemon, function: str | None = None) -> list[dict[str, Any]]:
    """Every invocation row in the daemon's database, oldest first, with its event decoded."""
    db = daemon.config.parent / "var" / "lambdaemon.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT function, trigger_id, dedupe_key, event FROM invocations"
            " WHERE ? IS NULL OR function = ? ORDER BY queued_at, rowid",
            (function, function),
        ).fetchall()
    finally:
        conn.close()
    return [
        {"function": f, "trigger_id": t, "dedupe_key": k, "event": json.loads(e)}
        for f, t, k, e in rows
    ]


async def until(predicate: Callable[[], Any], timeout_s: float = 15, what: str = "") -> Any:
    """Poll `predicate` (plain or async) until it returns something truthy; bounded."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                value = predicate()
                if isinstance(value, Awaitable):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(0.05)  # polling, bounded by the timeout above
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


async def publish(port: int, *messages: tuple[str, Any], qos: int = 1, retain: bool = False,
                  user: dict[str, str] | None = None) -> None:
    """(topic, payload) each, from a throwaway v5 client; waits for each PUBACK at QoS 1."""
    props = None
    if user:
        props = Properties(PacketTypes.PUBLISH)
        for pair in user.items():
            props.UserProperty = pair
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=props)


@contextlib.asynccontextmanager
async def daemon_for(tmp_path: Path, body: str):
    daemon = Daemon(write_config(tmp_path, body))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.close()


async def subscribed(daemon: Daemon, times: int = 1) -> None:
    await until(lambda: len(events(daemon, "mqtt_subscribed")) >= times, what="mqtt_subscribed")


class HoldingProxy:
    """A TCP proxy to the broker that can stop forwarding the client's bytes (its PUBACKs).

    `hold()` swallows everything the client sends on the current connections from then on, so
    messages get committed but never acknowledged; `cut()` closes those connections; new ones
    pass through again.
    """

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.port = free_port()
        self._held: set[asyncio.StreamWriter] = set()
        self._live: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def hold(self) -> None:
        self._held |= self._live

    def cut(self) -> None:
        for writer in list(self._live):
            writer.close()
        self._live.clear()
        self._held.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        self._live |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, writer)),
            asyncio.create_task(self._pump(up_reader, writer, None)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            self._live.discard(w)
        self._tasks.difference_update(pumps)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    client: asyncio.StreamWriter | None) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if client is not None and client in self._held:
                    continue  # swallowed: the broker never sees these PUBACKs
                dst.write(data)
                await dst.drain()


# --- delivery ----------------------------------------------------------------------------------


async def test_mqtt_routes_each_message_to_every_matching_trigger_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = mqtt_toml(mosquitto.url, {
        "temp": [("sensors/+/temp", 1)],
        "temp_too": [("sensors/+/temp", 1)],  # same filter, second function: one subscription
        "everything": [("sensors/#", 1)],  # overlaps: Mosquitto sends a copy per subscription
        "fire_and_forget": [("q0/#", 0)],
        "elsewhere": [("elsewhere/x", 1)],
    })  # fmt: skip
    async with daemon_for(tmp_path, body) as daemon:
        await subscribed(daemon, 4)
        await publish(mosquitto.port, ("sensors/a/temp", b'{"celsius": 21.5}'), user={"site": "lab"})
        await publish(
            mosquitto.port,
            ("sensors/b/status", "online"),
            ("sensors/c/raw", b"\xff\x00\xfe"),
            ("unrelated/topic", b"{}"),
        )
        await publish(mosquitto.port, ("q0/x", b"[1, 2]"), qos=0)
        await until(lambda: len(records(daemon)) >= 6, what="6 records")

        by_function: dict[str, list[dict[str, Any]]] = {}
        for row in records(daemon):
            by_function.setdefault(row["function"], []).append(row["event"])
        assert {k: len(v) for k, v in by_function.items()} == {
            "temp": 1, "temp_too": 1, "everything": 3, "fire_and_forget": 1,
        }  # fmt: skip
        temp = by_function["temp"][0]
        assert temp["topic"] == "sensors/a/temp" and temp["payload"] == {"celsius": 21.5}
        assert (temp["qos"], temp["retain"], temp["dup"]) == (1, False, False)
        assert RFC3339_MS.match(temp["received_at"])
        assert temp["properties"] == {"user": {"site": "lab"}}
        seen = {e["topic"]: e for e in by_function["everything"]}
        assert seen["sensors/b/status"]["payload"] == "online"
        raw = seen["sensors/c/raw"]
        assert (raw["payload"], raw["payload_encoding"]) == ("/wD+", "base64")
        assert by_function["fire_and_forget"][0]["payload"] == [1, 2]
        assert by_function["fire_and_forget"][0]["qos"] == 0

        # The handler got exactly that event.
        async def finished() -> Any:
            rows = await daemon.invocations(function="temp")
            return rows if rows and rows[0]["status"] == "succeeded" else None

        (row,) = await until(finished, what="temp's invocation to succeed")
        record = await daemon.get(f"/v1/invocations/{row['id']}")
        assert record["result"]["event"] == temp
        rejected = [e["topic"] for e in events(daemon, "mqtt_message_rejected")]
        assert rejected == []  # unrelated/topic is not subscribed at all


# --- the broker comes and goes ------------------------------------------------------------------


async def test_mqtt_broker_down_at_start_is_retried_while_the_daemon_serves(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")  # not started yet
    body = mqtt_toml(broker.url, {"temp": [("sensors/+/temp", 1)]})
    try:
        async with daemon_for(tmp_path, body) as daemon:
            down = await until(lambda: events(daemon, "mqtt_disconnected"), what="a failed connect")
            assert "refused" in down[0]["reason"].lower()
            assert (await daemon.get("/health"))  # the daemon is up and answering meanwhile
            status, _, answer = await daemon.invoke("temp", {"direct": True})
            assert status == 200 and json.loads(answer)["event"] == {"direct": True}

            broker.start()
            await subscribed(daemon)
            await publish(broker.port, ("sensors/a/temp", b"19"))
            rows = await until(lambda: records(daemon, "temp")[1:], what="the mqtt record")
            assert rows[0]["event"]["payload"] == 19
    finally:
        broker.close()


async def test_mqtt_broker_restart_keeps_the_session_across_the_reconnect(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = mqtt_toml(mosquitto.url, {"temp": [("sensors/+/temp", 1)]})
    async with daemon_for(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, ("sensors/a/temp", b'{"n": 0}'))
        await until(lambda: records(daemon), what="the first record")

        mosquitto.stop()
        await until(lambda: events(daemon, "mqtt_disconnected"), what="the disconnect")
        # Queue messages into the daemon's session while it surely cannot connect: the same
        # broker state served on another port. They arrive only if the reconnect resumes the
        # session (Clean Start = 0 with an expiry), not if it starts a new one.
        mosquitto.start(port=free_port())
        await publish(mosquitto.port_in_use, *(("sensors/b/temp", f'{{"n": {i}}}') for i in (1, 2, 3)))
        mosquitto.stop()
        mosquitto.start()

        await until(lambda: len(records(daemon)) >= 4, what="the queued messages")
        reconnect = events(daemon, "mqtt_connected")[-1]
        assert reconnect["session_present"] is True
        await publish(mosquitto.port, ("sensors/c/temp", b'{"n": 4}'))
        await until(lambda: len(records(daemon)) >= 5, what="a message after the restart")
        assert [r["event"]["payload"]["n"] for r in records(daemon)] == [0, 1, 2, 3, 4]
        assert len(events(daemon, "mqtt_subscribed")) >= 2  # re-subscribed on the reconnect


async def test_mqtt_messages_published_while_the_daemon_is_stopped_arrive_after_start(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await publish(mosquitto.port, ("sensors/r/temp", b"retained"), retain=True)
    body = mqtt_toml(mosquitto.url, {"temp": [("sensors/+/temp", 1)]})
    daemon = Daemon(write_config(tmp_path, body))
    try:
        await daemon.start()
        await subscribed(daemon)
        await until(lambda: records(daemon), what="the retained message")
        assert await daemon.stop() == 0

        await publish(mosquitto.port, *(("sensors/a/temp", f"[{i}]") for i in range(20)))
        await daemon.start()
        await until(lambda: len(records(daemon)) >= 21, what="the backlog")
        await subscribed(daemon, 2)
    finally:
        await daemon.close()
    payloads = [r["event"]["payload"] for r in records(daemon)]
    # The retained message came with the first subscription only, not again on re-subscribe.
    assert payloads == ["retained", *([i] for i in range(20))]
    assert records(daemon)[0]["event"]["retain"] is True
