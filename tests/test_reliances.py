"""What lambdaemon's speed tricks and library workarounds rely on is still there.

Each test stands for a reliance listed in docs/performance.md: a library's internals with the
shape our code needs, or a condition a trick needs to stay true. They fail on a library version
that moved an internal before the daemon would fail on it, or before a shortcut is quietly lost
(the structlog hot path, the worker's small imports, SCHED_BATCH under systemd). When one fails
after a version bump, re-check the code that relies on it as the doc says, then move the pin in
pyproject.toml.
"""

from __future__ import annotations

import asyncio
import inspect
import json.encoder
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import aiomqtt
import aiosqlite
import httptools
import pytest
import structlog
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from paho.mqtt import _packet
from paho.mqtt.client import ConnectFlags, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.config import ApiSettings
from daemon.destinations.mqtt import _PublishingClient
from daemon.http.api import start_site
from daemon.http.wire import FastSite, WireRequest, _resolve_now
from triggers.mqtt import _Client, _PublishProperties, puback


async def test_aiosqlite_runs_a_callable_in_its_own_thread_on_its_sqlite3_connection(
    tmp_path: Path,
) -> None:
    # daemon/store/sqlite.py: one _execute() hop per batch, on _conn; close() joins _thread.
    conn = await aiosqlite.connect(tmp_path / "reliance.db", isolation_level=None)
    try:
        assert isinstance(conn._conn, sqlite3.Connection)
        assert isinstance(conn._thread, threading.Thread) and conn._thread.is_alive()

        def where(db: sqlite3.Connection, value: int) -> tuple[int, sqlite3.Connection, int]:
            return threading.get_ident(), db, value

        ident, db, value = await conn._execute(where, conn._conn, 7)
        assert (ident, db, value) == (conn._thread.ident, conn._conn, 7)
    finally:
        await conn.close()
    conn._thread.join(timeout=5)
    assert not conn._thread.is_alive()


async def test_aiohttp_base_site_and_router_have_what_fast_site_uses() -> None:
    # daemon/http/wire.py: FastSite sets BaseSite._server (BaseSite.stop() closes it, and
    # BaseRunner.addresses lists its sockets); _resolve_now runs the app router's resolve() to
    # its end without a loop, on a WireRequest (it reads rel_url and method only).
    assert {"_runner", "_server"} <= set(web.BaseSite.__slots__)

    async def ok(request: object) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/fixed", ok)
    app.router.add_post("/items/{id}", ok)
    runner = await start_site(
        app,
        "127.0.0.1:0",
        "test.listen",
        router=None,
        max_body=lambda: 1,
        limits=ApiSettings,
    )
    try:
        (site,) = runner.sites
        assert isinstance(site, FastSite) and site._runner is runner
        assert runner.addresses == [sock.getsockname() for sock in site._server.sockets]
    finally:
        await runner.cleanup()
    app.freeze()

    def resolved(method: str, target: str) -> object:
        request = WireRequest(app, method, target, CIMultiDict(), HttpVersion11, None, None)
        return _resolve_now(app, request)

    match = resolved("POST", "/items/7?x=1")
    assert match is not None and match.handler is ok and match["id"] == "7"
    assert resolved("GET", "/fixed").handler is ok  # type: ignore[attr-defined]
    assert resolved("GET", "/none").http_exception.status == 404  # type: ignore[attr-defined]
    assert resolved("PUT", "/fixed").http_exception.status == 405  # type: ignore[attr-defined]


def test_httptools_reports_a_callback_exception_as_its_context() -> None:
    # daemon/http/wire.py: HttpConnection._feed_slices tells a request refused from a callback
    # (_Refused) from a broken one by HttpParserCallbackError.__context__.
    class Refusing:
        def on_headers_complete(self) -> None:
            raise LookupError("refused")

    parser = httptools.HttpRequestParser(Refusing())
    try:
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    except httptools.HttpParserCallbackError as exc:
        assert isinstance(exc.__context__, LookupError)
    else:
        raise AssertionError("no HttpParserCallbackError")


def test_structlog_get_config_hands_back_the_configured_objects_themselves() -> None:
    # daemon/logs.py: the per-invocation lines skip structlog only while get_config() returns
    # the very objects configure_logging installed; a copy would silently turn the shortcut off.
    processors = [structlog.processors.add_log_level, structlog.processors.JSONRenderer()]
    factory = structlog.PrintLoggerFactory()
    try:
        structlog.configure(processors=processors, logger_factory=factory)
        config = structlog.get_config()
        assert config["processors"] is processors and config["logger_factory"] is factory
        assert structlog.get_config()["processors"] is config["processors"]
    finally:
        structlog.reset_defaults()


def test_json_make_iterencode_takes_the_arguments_the_worker_passes() -> None:
    # daemon/pool/worker.py: _encode_with_decimals calls it with these ten, by position.
    params = list(inspect.signature(json.encoder._make_iterencode).parameters)  # type: ignore[attr-defined]
    assert params[:10] == [
        "markers",
        "_default",
        "_encoder",
        "_indent",
        "_floatstr",
        "_key_separator",
        "_item_separator",
        "_sort_keys",
        "_skipkeys",
        "_one_shot",
    ]


def _subscriber() -> _Client:
    return _Client("127.0.0.1", 1883, identifier="reliance", protocol=aiomqtt.ProtocolVersion.V5)


async def test_aiomqtt_client_state_the_mqtt_trigger_resets_and_reads() -> None:
    # triggers/mqtt.py: _Client.__aenter__ empties _queue and replaces a stale _connected while
    # _lock is free; _client is the paho client whose manual acks the trigger drives.
    client = _subscriber()
    assert isinstance(client._queue, asyncio.Queue)
    assert isinstance(client._connected, asyncio.Future) and not client._connected.done()
    assert isinstance(client._lock, asyncio.Lock) and not client._lock.locked()
    # _receive reads _queue itself and learns of a lost connection from _disconnected, a future
    # that aiomqtt completes then (and replaces on the next connect).
    assert isinstance(client._disconnected, asyncio.Future)
    assert callable(client._client.manual_ack_set) and callable(client._client.ack)


async def test_aiomqtt_calls_the_trigger_overrides_with_paho_arguments() -> None:
    # paho calls aiomqtt's _on_connect/_on_message through the callbacks aiomqtt registered in
    # its __init__: our overrides must be those, and take the arguments paho passes.
    client = _subscriber()
    paho = client._client
    props = Properties(PacketTypes.CONNACK)
    props.SubscriptionIdentifierAvailable = 0
    paho.on_connect(
        paho, None, ConnectFlags(session_present=True), ReasonCode(PacketTypes.CONNACK), props
    )
    assert client.session_present is True and client.subscription_ids is False
    assert client._connected.done() and client._connected.exception() is None

    message = MQTTMessage(mid=7, topic=b"sensors/1")
    message.payload, message.qos, message.dup = b"21.5", 1, True
    paho.on_message(paho, None, message)
    received = client._queue.get_nowait()
    assert isinstance(received, aiomqtt.Message)
    assert (received.topic.value, received.payload, received.mid) == ("sensors/1", b"21.5", 7)
    assert received.dup is True  # type: ignore[attr-defined]


async def test_aiomqtt_calls_the_publisher_override_with_the_puback_reason() -> None:
    # daemon/destinations/mqtt.py: _PublishingClient._on_publish keeps the PUBACK reason code.
    client = _PublishingClient(
        "127.0.0.1", 1883, identifier="reliance-out", protocol=aiomqtt.ProtocolVersion.V5
    )
    quota = ReasonCode(PacketTypes.PUBACK, "Quota exceeded")
    client._client.on_publish(client._client, None, 3, quota, Properties(PacketTypes.PUBACK))
    assert client.puback is quota


def test_the_worker_imports_neither_typing_nor_msgspec_nor_asyncio() -> None:
    # daemon/pool/protocol.py, worker.py, __init__.py: each warm worker's RSS and start-up time
    # depend on this (TYPE_CHECKING = False instead of typing's; stdlib json; no asyncio).
    code = "import sys, daemon.pool.worker; print(*sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    assert "daemon.pool.worker" in loaded
    assert not {"typing", "msgspec", "asyncio"} & set(loaded)


def test_the_service_unit_lets_workers_switch_to_sched_batch() -> None:
    # daemon/pool/worker.py: _yield_to_the_daemon; ~@resources alone answers it with EPERM and
    # the workers would silently stay SCHED_OTHER.
    unit = Path(__file__).resolve().parent.parent / "systemd" / "lambdaemon.service"
    filters = [
        line.split("=", 1)[1].split()
        for line in unit.read_text().splitlines()
        if line.startswith("SystemCallFilter=")
    ]
    denied = next(i for i, names in enumerate(filters) if names[0].startswith("~"))
    assert "@resources" in " ".join(filters[denied])
    assert any(names == ["sched_setscheduler"] for names in filters[denied + 1 :])


_HEAP_PROBE = """
import sys
from daemon.memory import keep_heap_small

def rss_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

if sys.argv[1] == "fixed":
    assert keep_heap_small()
before = rss_kb()
kept = []  # small buffers that outlive each big one, as the daemon's other objects do
for _ in range(3):  # the copies a 6 MB result makes in the daemon, made and freed again
    chunks = []
    for _ in range(8):
        chunks.append(bytearray(b"x") * (6 * 1024 * 1024))
        kept.append(bytearray(1000))  # malloc'd (over 512 bytes): it pins the heap's top
    del chunks
print(rss_kb() - before)
"""


@pytest.mark.parametrize("threshold", ["fixed", "glibc's default"])
def test_glibc_gives_big_buffers_back_once_its_mmap_threshold_is_fixed(threshold: str) -> None:
    # daemon/memory.py: keep_heap_small(). Without it, glibc raises its mmap threshold after the
    # first big free, and later buffers of that size stay in the heap once freed (the control).
    kept_kb = int(
        subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, threshold.split()[0]],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    if threshold == "fixed":
        assert kept_kb < 2 * 1024
    else:
        assert kept_kb > 8 * 1024


def test_signal_alarm_is_the_c_modules_own() -> None:
    # daemon/pool/worker.py: _restore_state cancels a handler's alarm with _signal.alarm, the C
    # function signal.py re-exports, so the worker need not import signal.py and its enums.
    import _signal  # type: ignore[import-not-found]
    import signal

    assert _signal.alarm is signal.alarm  # (not called here: the test runner's timeout uses it)


async def test_paho_sends_a_queued_packet_of_several_pubacks_as_it_is() -> None:
    # triggers/mqtt.py: puback() queues the PUBACKs of one loop turn as one packet through
    # paho's _packet_queue(command, packet, mid, qos), which aiomqtt's write callback sends.
    client = _subscriber()
    paho = client._client
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    broker.setblocking(False)
    paho._sock = ours
    try:
        puback(paho, [1, 2, 0x1234])
        received = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(broker, 64), 5)
        assert received == bytes.fromhex("400200014002000240021234")
        assert not paho._out_packet  # sent whole, nothing left queued
    finally:
        paho._sock = None
        ours.close()
        broker.close()


def _published(properties: bytes) -> bytes:
    """A QoS 1 PUBLISH's variable header and payload, with these encoded v5 properties."""
    return b"\x00\x03a/b\x00\x07" + properties + b'{"n": 1}'


def _vbi_prefixed(items: bytes) -> bytes:
    assert len(items) < 128  # one length byte
    return bytes([len(items)]) + items


def test_paho_decodes_publish_properties_with_the_class_the_trigger_installs() -> None:
    # triggers/mqtt.py puts _PublishProperties in place of the Properties class that
    # paho.mqtt._packet.decode_publish builds: it must be that name decode_publish uses, and
    # what it decodes must be what paho's own class decodes, properties and errors alike.
    assert _packet.Properties is _PublishProperties  # type: ignore[attr-defined]
    every = Properties(PacketTypes.PUBLISH)
    every.PayloadFormatIndicator = 1
    every.MessageExpiryInterval = 60
    every.TopicAlias = 3
    every.ResponseTopic = "r/t"
    every.CorrelationData = b"\x00\x01"
    every.ContentType = "application/json"
    every.UserProperty = [("a", "1"), ("a", "2")]
    every.SubscriptionIdentifier = 5
    every.SubscriptionIdentifier = 300000
    content_type = b"\x03\x00\x01x"
    cases = {
        "every property": every.pack(),
        "none": b"\x00",
        "one subscription id": b"\x02\x0b\x05",
        "a property twice": _vbi_prefixed(content_type * 2),
        "an unknown property": _vbi_prefixed(b"\x7f\x01"),
        "a value out of range": _vbi_prefixed(b"\x01\x02"),
        "a string past the end": _vbi_prefixed(b"\x03\x00\x09x"),
    }

    def decoded(cls: type[Properties], case: bytes) -> tuple[str, object, bool] | str:
        _packet.Properties = cls  # type: ignore[attr-defined]
        try:
            got = _packet.decode_publish(0x32, _published(case), MQTTProtocolVersion.MQTTv5)
        except _packet.MalformedPacket as exc:
            return f"MalformedPacket: {exc}"
        finally:
            _packet.Properties = _PublishProperties  # type: ignore[attr-defined]
        props = got.properties
        assert props is not None and got.payload == b'{"n": 1}' and got.mid == 7
        return str(props), props.json(), props.isEmpty()

    for name, case in cases.items():
        ours, pahos = decoded(_PublishProperties, case), decoded(Properties, case)
        assert ours == pahos, name
    assert isinstance(decoded(_PublishProperties, cases["a property twice"]), str)
    assert decoded(_PublishProperties, cases["one subscription id"])[1] == {  # type: ignore[index]
        "SubscriptionIdentifier": [5]
    }
