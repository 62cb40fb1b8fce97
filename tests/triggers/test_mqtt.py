"""The MQTT source against a real Mosquitto: mostly inside the real daemon (a subprocess).

Records are read straight from the daemon's SQLite file (read-only), so they can be counted
while the daemon is down or after a SIGKILL. Every wait is bounded, and woken by what the
daemon logs: a stored message's row is committed before its invocation_started line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import ssl
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import load_config
from daemon.credentials import mqtt_connection
from daemon.dispatcher import Dispatcher
from daemon.errors import ConfigError
from daemon.pool import WorkerPool
from daemon.store.sqlite import Store
from tests.daemon_proc import Daemon, running_daemon, write_config
from tests.mosquitto import Mosquitto, free_port
from tests.waits import watch_logs
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


def count(daemon: Daemon) -> int:
    """len(records(daemon)), without reading the rows."""
    db = daemon.config.parent / "var" / "lambdaemon.db"
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM invocations").fetchone()[0])
    finally:
        conn.close()


async def stored(daemon: Daemon, check: Any, what: str, timeout_s: float = 20) -> Any:
    """`check()` once true, tried each time the daemon logs (a row is committed, then logged)."""
    return await daemon.wait_logged(check, timeout_s, what)


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


async def publish(
    port: int,
    *messages: tuple[str, Any],
    qos: int = 1,
    retain: bool = False,
    user: dict[str, str] | None = None,
    **client: Any,
) -> None:
    """(topic, payload) each, from a throwaway v5 client; waits for each PUBACK at QoS 1."""
    props = None
    if user:
        props = Properties(PacketTypes.PUBLISH)
        for pair in user.items():
            props.UserProperty = pair
    v5 = aiomqtt.ProtocolVersion.V5
    async with aiomqtt.Client("127.0.0.1", port, protocol=v5, **client) as publisher:
        for topic, payload in messages:
            await publisher.publish(topic, payload, qos=qos, retain=retain, properties=props)


async def subscribed(daemon: Daemon, times: int = 1) -> None:
    await daemon.wait_log("mqtt_subscribed", times)


class AckDroppingProxy:
    """A TCP proxy to the broker that can drop the PUBACKs its clients send.

    With `drop_acks` set, messages get committed but the broker never hears they were: exactly
    the state a crash between commit and PUBACK leaves. `cut()` closes every connection;
    `disconnect(reason)` tells the clients why first.
    """

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.port = free_port()
        self.drop_acks = False
        self.acks_dropped = 0
        self.acks_forwarded = 0
        self._acked = asyncio.Event()  # set on every PUBACK, dropped or forwarded
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()  # those towards the clients
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> AckDroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def acks(
        self, *, dropped: int | None = None, forwarded: int | None = None, what: str = ""
    ) -> None:
        """Wait (bounded) until this many PUBACKs have been dropped and forwarded."""
        try:
            async with asyncio.timeout(15):
                while (dropped, forwarded) != (
                    self.acks_dropped if dropped is not None else None,
                    self.acks_forwarded if forwarded is not None else None,
                ):
                    self._acked.clear()
                    await self._acked.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.close()

    def disconnect(self, reason: int) -> None:
        """Send each client an MQTT v5 DISCONNECT with this reason code, as a broker ending the
        connection would, and close every connection (call it while no message flows)."""
        for writer in self._clients:
            writer.write(bytes([0xE0, 2, reason, 0]))  # no properties
        self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        self._writers |= {writer, up_writer}
        self._clients.add(writer)
        pumps = {
            asyncio.create_task(self._client_to_broker(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        }
        self._tasks |= pumps
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)
        self._clients.discard(writer)
        self._tasks -= pumps

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

    async def _client_to_broker(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:  # MQTT framing: a type byte, then the remaining length as a varint
                header = await src.readexactly(1)
                length, shift = 0, 0
                while True:
                    byte = (await src.readexactly(1))[0]
                    header += bytes([byte])
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if byte < 0x80:
                        break
                packet = header + await src.readexactly(length)
                if packet[0] >> 4 == 4:  # PUBACK
                    self._acked.set()
                    if self.drop_acks:
                        self.acks_dropped += 1
                        continue
                    self.acks_forwarded += 1
                dst.write(packet)
                await dst.drain()


# --- delivery ----------------------------------------------------------------------------------


async def test_mqtt_routes_each_message_to_every_matching_trigger_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = mqtt_toml(
        mosquitto.url,
        {
            "temp": [("sensors/+/temp", 1)],
            "temp_too": [("sensors/+/temp", 1)],  # same filter, second function: one subscription
            "everything": [("sensors/#", 1)],  # overlaps: Mosquitto sends a copy per subscription
            "fire_and_forget": [("q0/#", 0)],
            "elsewhere": [("elsewhere/x", 1)],
        },
    )
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon, 4)
        await publish(
            mosquitto.port, ("sensors/a/temp", b'{"celsius": 21.5}'), user={"site": "lab"}
        )
        await publish(
            mosquitto.port,
            ("sensors/b/status", "online"),
            ("sensors/c/raw", b"\xff\x00\xfe"),
            ("unrelated/topic", b"{}"),
        )
        await publish(mosquitto.port, ("q0/x", b"[1, 2]"), qos=0)
        await stored(daemon, lambda: count(daemon) >= 6, what="6 records")

        by_function: dict[str, list[dict[str, Any]]] = {}
        for row in records(daemon):
            by_function.setdefault(row["function"], []).append(row["event"])
        assert {k: len(v) for k, v in by_function.items()} == {
            "temp": 1,
            "temp_too": 1,
            "everything": 3,
            "fire_and_forget": 1,
        }
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
        await daemon.wait_log("invocation_finished", function="temp", status="succeeded")
        (row,) = await daemon.invocations(function="temp")  # read after its outcome's write
        record = await daemon.get(f"/v1/invocations/{row['id']}")
        assert record["result"]["event"] == temp
        rejected = [e["topic"] for e in events(daemon, "mqtt_message_rejected")]
        assert rejected == []  # unrelated/topic is not subscribed at all


# --- the broker comes and goes ------------------------------------------------------------------


async def test_mqtt_broker_down_at_start_is_retried_while_the_daemon_serves(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")  # not started yet
    body = mqtt_toml(broker.url, {"temp": [("sensors/+/temp", 1)]})
    try:
        async with running_daemon(tmp_path, body) as daemon:
            down = await daemon.wait_log("mqtt_disconnected")  # a failed connect
            assert "refused" in down[0]["reason"].lower()
            assert await daemon.get("/health")  # the daemon is up and answering meanwhile
            status, _, answer = await daemon.invoke("temp", {"direct": True})
            assert status == 200 and json.loads(answer)["event"] == {"direct": True}

            broker.start()
            await subscribed(daemon)
            await publish(broker.port, ("sensors/a/temp", b"19"))
            rows = await stored(daemon, lambda: records(daemon, "temp")[1:], "the mqtt record")
            assert rows[0]["event"]["payload"] == 19
    finally:
        broker.close()


async def test_mqtt_broker_restart_keeps_the_session_across_the_reconnect(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = mqtt_toml(mosquitto.url, {"temp": [("sensors/+/temp", 1)]})
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, ("sensors/a/temp", b'{"n": 0}'))
        await stored(daemon, lambda: records(daemon), "the first record")

        mosquitto.stop()
        await daemon.wait_log("mqtt_disconnected")
        # Queue messages into the daemon's session while it surely cannot connect: the same
        # broker state served on another port. They arrive only if the reconnect resumes the
        # session (Clean Start = 0 with an expiry), not if it starts a new one.
        mosquitto.start(port=free_port())
        await publish(
            mosquitto.port_in_use, *(("sensors/b/temp", f'{{"n": {i}}}') for i in (1, 2, 3))
        )
        mosquitto.stop()
        mosquitto.start()

        await stored(daemon, lambda: count(daemon) >= 4, "the queued messages")
        reconnect = events(daemon, "mqtt_connected")[-1]
        assert reconnect["session_present"] is True
        await publish(mosquitto.port, ("sensors/c/temp", b'{"n": 4}'))
        await stored(daemon, lambda: count(daemon) >= 5, "a message after the restart")
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
        await stored(daemon, lambda: records(daemon), "the retained message")
        assert await daemon.stop() == 0

        await publish(mosquitto.port, *(("sensors/a/temp", f"[{i}]") for i in range(20)))
        await daemon.start()
        await stored(daemon, lambda: count(daemon) >= 21, "the backlog")
        await subscribed(daemon, 2)
    finally:
        await daemon.close()
    payloads = [r["event"]["payload"] for r in records(daemon)]
    # The retained message came with the first subscription only, not again on re-subscribe.
    assert payloads == ["retained", *([i] for i in range(20))]
    assert records(daemon)[0]["event"]["retain"] is True


# --- no loss, no duplicates ---------------------------------------------------------------------


async def test_mqtt_sigkill_mid_stream_keeps_every_message_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    total = 1500
    body = mqtt_toml(mosquitto.url, {"temp": [("sensors/+/temp", 1)]})
    daemon = Daemon(write_config(tmp_path, body))
    try:
        await daemon.start()
        await subscribed(daemon)
        # Every payload unique, so a duplicate record or a missing one shows as such.
        publisher = asyncio.create_task(
            publish(mosquitto.port, *(("sensors/a/temp", f'{{"n": {i}}}') for i in range(total)))
        )
        for at in (200, 700):  # killed twice while messages stream in, with commits in flight
            await stored(daemon, lambda at=at: count(daemon) >= at, f"{at} records")
            await daemon.kill()
            await daemon.start()
        await asyncio.wait_for(publisher, 30)  # every message has been acked to the publisher
        await stored(daemon, lambda: count(daemon) >= total, "all records", timeout_s=30)
    finally:
        await daemon.close()
    numbers = sorted(r["event"]["payload"]["n"] for r in records(daemon))
    assert numbers == list(range(total))


async def test_mqtt_redelivery_after_commit_maps_to_the_same_invocation(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with AckDroppingProxy(mosquitto.port) as proxy:
        body = mqtt_toml(f"mqtt://127.0.0.1:{proxy.port}", {"temp": [("sensors/+/temp", 1)]})
        daemon = Daemon(write_config(tmp_path, body))
        try:
            await daemon.start()
            await subscribed(daemon)

            # 1. Committed, PUBACKs lost, connection dropped: the broker redelivers with DUP set
            #    to the same process. Two identical payloads stay two events.
            proxy.drop_acks = True
            same, other = ("sensors/a/temp", b"same"), ("sensors/a/temp", b"other")
            await publish(mosquitto.port, same, same, other)
            await proxy.acks(dropped=3, what="3 commits acked (and dropped)")
            assert len(records(daemon)) == 3
            proxy.drop_acks = False
            proxy.cut()
            await proxy.acks(forwarded=3, what="the redeliveries acked")
            assert len(events(daemon, "mqtt_redelivery_matched")) == 3
            assert len(records(daemon)) == 3

            # 2. Committed, then SIGKILL before the PUBACK: the redelivery goes to the next run.
            proxy.drop_acks = True
            await publish(mosquitto.port, same)
            await proxy.acks(dropped=4, what="a 4th commit (same payload)")
            await daemon.kill()
            proxy.drop_acks = False
            await daemon.start()
            await proxy.acks(forwarded=4, what="the redelivery after the restart")
            assert len(events(daemon, "mqtt_redelivery_matched")) == 4

            # 3. The same payload published again is a new event, not a redelivery.
            await publish(mosquitto.port, same)
            await proxy.acks(forwarded=5, what="a 5th message")
        finally:
            await daemon.close()
    rows = records(daemon)
    assert [r["event"]["payload"] for r in rows] == ["same", "same", "other", "same", "same"]
    assert [r["event"]["dup"] for r in rows] == [False] * 5  # the first deliveries' events
    assert len({r["dedupe_key"] for r in rows}) == 5


async def test_mqtt_publisher_message_id_is_the_idempotency_key(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = mqtt_toml(mosquitto.url, {"temp": [("sensors/+/temp", 1)]})
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        for _ in range(2):  # a publisher retrying after a lost PUBACK of its own
            await publish(mosquitto.port, ("sensors/a/temp", b"1"), user={"message-id": "m-1"})
        await publish(mosquitto.port, ("sensors/a/temp", b"1"), user={"message-id": "m-2"})
        await stored(daemon, lambda: count(daemon) == 2, "two records")
        await daemon.wait_log("mqtt_redelivery_matched")  # the retry
        assert [r["event"]["properties"]["user"]["message-id"] for r in records(daemon)] == [
            "m-1",
            "m-2",
        ]


async def test_mqtt_commit_failure_is_not_acked_and_the_message_comes_back(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = load_config(write_config(tmp_path, mqtt_toml(mosquitto.url, {"temp": [("a/#", 1)]})))
    triggers = [("temp", "temp#0", config.functions["temp"].triggers[0])]
    pool = WorkerPool(2)
    async with Store.open(tmp_path / "db.sqlite") as store:
        await pool.start(config.functions)
        dispatcher = Dispatcher(store, pool, config.functions)
        with watch_logs() as logs:
            task = asyncio.create_task(supervise(MqttSource(config, store, triggers), dispatcher))
            try:
                await logs.wait_for("mqtt_subscribed", timeout_s=15)
                # A full disk for real: the database may not grow by a single page.
                await store.transaction(lambda c: c.execute("PRAGMA max_page_count = 1").fetchone())
                await publish(mosquitto.port, ("a/big", b"x" * 300_000))
                await logs.wait_for("mqtt_disconnected", timeout_s=15)  # the source drops it
                assert (
                    "not stored"
                    in [e for e in logs if e["event"] == "mqtt_disconnected"][0]["reason"]
                )
                assert [e["function"] for e in logs if e["event"] == "mqtt_message_not_stored"]
                assert (await store.query("SELECT COUNT(*) FROM invocations"))[0][0] == 0

                await store.transaction(
                    lambda c: c.execute("PRAGMA max_page_count = 1073741823").fetchone()
                )
                # The redelivery: its row is committed before it is started.
                await logs.wait_for("invocation_started", function="temp", timeout_s=15)
                rows = await store.query("SELECT event FROM invocations")
                assert len(rows) == 1 and json.loads(rows[0][0])["payload"] == "x" * 300_000
                assert task.done() is False  # the source never gave up
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await dispatcher.drain(5)
                await pool.close()


# --- connection settings ------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a broker password file."""
    d = {n: tmp_path / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")}
    (tmp_path / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl = [
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            d["ca.key"],
            "-out",
            d["ca.crt"],
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            d["server.key"],
            "-out",
            d["server.csr"],
        ],
        [
            "x509",
            "-req",
            "-in",
            d["server.csr"],
            "-CA",
            d["ca.crt"],
            "-CAkey",
            d["ca.key"],
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            d["server.crt"],
            "-extfile",
            tmp_path / "san.ext",
        ],
    ]
    for args in openssl:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)
    d["passwd"] = tmp_path / "broker.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(d["passwd"]), "edge", "s3cret"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return d


async def test_mqtt_tls_with_username_and_password(tmp_path: Path, tls: dict[str, Path]) -> None:
    (tmp_path / "mqtt.password").write_text("s3cret\n")
    broker = Mosquitto(
        tmp_path / "mosquitto",
        extra_conf=(
            f"cafile {tls['ca.crt']}\ncertfile {tls['server.crt']}\n"
            f"keyfile {tls['server.key']}\npassword_file {tls['passwd']}\nallow_anonymous false\n"
        ),
    )
    broker.start()
    try:
        extra = f'username = "edge"\npassword_file = "mqtt.password"\nca_file = "{tls["ca.crt"]}"'
        body = mqtt_toml(f"mqtts://127.0.0.1:{broker.port}", {"temp": [("t/#", 1)]}, extra)
        async with running_daemon(tmp_path, body) as daemon:
            await subscribed(daemon)
            context = ssl.create_default_context(cafile=str(tls["ca.crt"]))
            await publish(
                broker.port, ("t/1", b"ok"), tls_context=context, username="edge", password="s3cret"
            )
            rows = await stored(daemon, lambda: records(daemon), "the record over TLS")
            assert rows[0]["event"]["payload"] == "ok"
            with pytest.raises(aiomqtt.MqttError):  # the credentials were really needed
                await publish(broker.port, ("t/1", b"anonymous"), tls_context=context)
    finally:
        broker.close()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ('url = "http://127.0.0.1:1883"', "mqtt.url"),
        ('url = "mqtt://:1883"', "mqtt.url"),
        ('url = "mqtt://127.0.0.1:99999"', "mqtt.url"),
        ('url = "mqtt://127.0.0.1"\nca_file = "ca.crt"', "mqtt.ca_file"),
        ('url = "mqtts://127.0.0.1"\nca_file = "missing.crt"', "mqtt.ca_file"),
    ],
)
def test_mqtt_bad_connection_settings_name_their_key(
    tmp_path: Path, settings: str, key: str
) -> None:
    body = mqtt_toml("mqtt://unused", {"temp": [("t/#", 1)]})
    with pytest.raises(ConfigError) as info:  # `lambdaemon check` and every start refuse it
        load_config(write_config(tmp_path, body.replace('url = "mqtt://unused"', settings)))
    assert info.value.key == key
    # The source and mqtt_connection() name the key too, given those settings unvalidated.
    valid = load_config(write_config(tmp_path, body))
    assert valid.mqtt is not None
    bad = msgspec.structs.replace(valid.mqtt, **tomllib.loads(settings))
    config = msgspec.structs.replace(valid, mqtt=bad)
    triggers = [("temp", "temp#0", config.functions["temp"].triggers[0])]
    with pytest.raises(ConfigError) as info:
        MqttSource(config, store=None, triggers=triggers)
    assert info.value.key == key
    with pytest.raises(ConfigError) as info:  # what `lambdaemon check` can call
        mqtt_connection(config)
    assert info.value.key == key


# --- event shapes ------------------------------------------------------------------------------


def iot_toml(url: str, triggers: dict[str, str]) -> str:
    """An [mqtt] section and one mqtt_record function per entry: name -> extra trigger keys."""
    out = f'[mqtt]\nurl = "{url}"\nclient_id = "lambdaemon-test"\n'
    for name, keys in triggers.items():
        out += f'[functions.{name}]\nhandler = "handler.handler"\ncode = "{RECORD}"\n'
        out += f'[[functions.{name}.triggers]]\ntype = "mqtt"\ntopic = "dev/#"\n{keys}\n'
    return out


async def test_mqtt_iot_format_delivers_the_payload_as_the_event(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = iot_toml(
        mosquitto.url,
        {
            "with_topic": 'event_format = "iot"\ntopic_field = "topic"',
            "bare": 'event_format = "iot"',
            "wrapped": "",  # the default shape, on the same subscription
        },
    )
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(
            mosquitto.port,
            ("dev/a/telemetry", b'{"row": "10", "moisture": 75, "topic": "from payload"}'),
            ("dev/b/list", b"[1, 2]"),
            ("dev/c/text", "online"),
            ("dev/d/raw", b"\xff\x00\xfe"),
        )
        await stored(daemon, lambda: count(daemon) >= 12, what="12 records")
        shapes = {f: [r["event"] for r in records(daemon, f)] for f in ("with_topic", "bare")}
        assert shapes["with_topic"] == [
            {"row": "10", "moisture": 75, "topic": "dev/a/telemetry"},  # topic() wins, as in SQL
            {"data": "WzEsIDJd", "topic": "dev/b/list"},
            {"data": "b25saW5l", "topic": "dev/c/text"},
            {"data": "/wD+", "topic": "dev/d/raw"},
        ]
        assert shapes["bare"] == [
            {"row": "10", "moisture": 75, "topic": "from payload"},
            {"data": "WzEsIDJd"},
            {"data": "b25saW5l"},
            {"data": "/wD+"},
        ]
        assert [r["event"]["payload"] for r in records(daemon, "wrapped")][:2] == [
            {"row": "10", "moisture": 75, "topic": "from payload"},
            [1, 2],
        ]
        # The handler got exactly that object.
        await daemon.wait_log("invocation_finished", 4, function="with_topic", status="succeeded")
        rows = await daemon.invocations(function="with_topic")
        got = [(await daemon.get(f"/v1/invocations/{r['id']}"))["result"]["event"] for r in rows]
        assert sorted(got, key=json.dumps) == sorted(shapes["with_topic"], key=json.dumps)


async def test_mqtt_iot_format_rejects_json_nested_too_deep_like_the_default_shape(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = iot_toml(mosquitto.url, {"deep": 'event_format = "iot"\ntopic_field = "topic"'})
    async with running_daemon(tmp_path, body) as daemon:
        await subscribed(daemon)
        await publish(mosquitto.port, ("dev/deep", b"[" * 600 + b"]" * 600), ("dev/ok", b"{}"))
        await daemon.wait_log("invocation_finished", function="deep", status="succeeded")
        await daemon.wait_log("event_rejected")
        rows = {r["status"]: r for r in await daemon.invocations(function="deep")}
        assert sorted(rows) == ["failed", "succeeded"]
        rejected = await daemon.get(f"/v1/invocations/{rows['failed']['id']}")
        assert (rejected["attempt"], rejected["error_type"]) == (0, "EventRejected")
        assert "nests deeper than" in json.dumps(rejected)


def test_mqtt_topic_field_without_the_iot_format_is_a_config_error(tmp_path: Path) -> None:
    body = iot_toml("mqtt://unused", {"temp": 'topic_field = "topic"'})
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    assert info.value.key == "functions.temp.triggers[0].topic_field"
    assert "event_format" in info.value.reason
