"""Destinations: Lambda's record, function/mqtt/webhook targets, the outbox, the 16-hop stop.

Real parts throughout: Store, WorkerPool, Dispatcher and OutboxRelay in-process, or the daemon
as a subprocess; a private Mosquitto; an aiohttp receiver on loopback. Every wait is bounded,
and on what the parts signal: the relay logs each delivery after enqueueing its outbox write, so
the outbox is read after a store barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiohttp import web
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import capture_logs

from daemon.config import Config, FunctionConfig, load_config
from daemon.destinations.relay import OutboxRelay
from daemon.destinations.routing import MAX_HOPS, Router
from daemon.dispatcher import Dispatcher
from daemon.errors import ConfigError
from daemon.models import Outcome, Status
from daemon.pool import WorkerPool
from daemon.store.sqlite import NewInvocation, Settled, Store
from tests.daemon_proc import Daemon, free_port, shared_folder, write_config
from tests.mosquitto import Mosquitto, running_broker
from tests.test_retries import FLAKY, dispatching, final, flaky
from tests.waits import watch_logs

FUNCTIONS = Path(__file__).resolve().parents[1] / "functions"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
V5 = aiomqtt.ProtocolVersion.V5


def fn(name: str, folder: str, **settings: Any) -> FunctionConfig:
    return FunctionConfig(
        handler="handler.handler", name=name, code=str(FUNCTIONS / folder), **settings
    )


async def child_of(store: Store, parent_id: str) -> dict[str, Any]:
    """The invocation a destination made: committed with its parent's final record."""
    await store.barrier()
    [row] = await store.query("SELECT id FROM invocations WHERE parent_id = ?", (parent_id,))
    record = await store.get(row["id"])
    assert record is not None
    return record


def outbox_rows(db: Path) -> list[dict[str, Any]]:
    """The outbox straight from the SQLite file (read-only), usable while a daemon is dead."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY id")]
    finally:
        conn.close()


class Receiver:
    """A webhook target on loopback; `answer(record)` picks each response's status."""

    def __init__(self, answer: Callable[[dict[str, Any]], int] = lambda record: 200) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.requests: list[dict[str, Any]] = []
        self.arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._answer = answer
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        record = await request.json()
        status = self._answer(record)
        item = {"record": record, "headers": dict(request.headers), "status": status}
        self.requests.append(item)
        self.arrived.put_nowait(item)
        return web.Response(status=status, text="not this one" if status >= 400 else "ok")


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_broker(tmp_path / "mosquitto") as mosquitto:
        yield mosquitto


def config_with(tmp_path: Path, body: str) -> Config:
    return load_config(write_config(tmp_path, body))


def fn_toml(name: str, **settings: Any) -> str:
    lines = [f"[functions.{name}]", 'handler = "handler.handler"', f'code = "{FLAKY}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def serving(config: Config, *, relay: bool = True) -> AsyncIterator[tuple[Dispatcher, Store]]:
    """Store, outbox relay (optional), pool and dispatcher, wired as service.py wires them."""
    async with Store.open(config.data_dir / "lambdaemon.db") as store:
        async with contextlib.AsyncExitStack() as stack:
            wake = None
            if relay:
                wake = (await stack.enter_async_context(OutboxRelay.open(config, store))).wake
            pool = WorkerPool(4)
            await pool.start(config.functions)
            dispatcher = Dispatcher(store, pool, config.functions, on_outbox=wake)
            try:
                await dispatcher.recover()
                yield dispatcher, store
            finally:
                await dispatcher.drain(5)
                await pool.close()


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("archive", "is not function:NAME"),
        ("sqs:queue", "is not function:NAME"),
        ("function:nope", "no function 'nope' is configured"),
        ("mqtt:alerts/x", "needs an [mqtt] section"),
        ("webhook:ftp://host/x", "is not an http:// or https:// URL"),
        ("webhook:http://host:99999/x", "invalid port"),
    ],
)
def test_destination_config_names_key_and_reason(tmp_path: Path, value: str, reason: str):
    with pytest.raises(ConfigError) as caught:
        config_with(tmp_path, fn_toml("sensor", on_failure=value))
    assert caught.value.key == "functions.sensor.on_failure" and reason in caught.value.reason
    mqtt = '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n'
    with pytest.raises(ConfigError, match="not an MQTT topic to publish to"):
        config_with(tmp_path, mqtt + fn_toml("sensor", on_success="mqtt:alerts/#"))


# --- function destinations ------------------------------------------------------------------------


async def test_function_destination_on_success_gets_the_record(tmp_path: Path):
    source = flaky("sensor", on_success="function:archive")
    async with dispatching(tmp_path / "db", source, fn("archive", "echo")) as (dispatcher, store):
        event = {"dir": str(shared_folder(tmp_path) / "calls"), "reading": 21.5}
        accepted = await dispatcher.accept("sensor", event, trigger="test", trigger_id="t#0")
        assert await final(dispatcher, accepted.invocation_id) == "succeeded"
        child = await child_of(store, accepted.invocation_id)
        assert await final(dispatcher, child["id"]) == "succeeded"
        # sync invocations have no destinations, as in Lambda
        sync_id, _ = await dispatcher.invoke_sync(
            "sensor", json.dumps(event).encode(), trigger="test"
        )
        await dispatcher.drain(5)
        assert not await store.query("SELECT id FROM invocations WHERE parent_id = ?", (sync_id,))
    assert (child["function"], child["trigger"], child["invocation_type"]) == (
        "archive",
        "destination",
        "async",
    )
    assert (child["parent_id"], child["hops"]) == (accepted.invocation_id, 1)
    record = json.loads(child["event"])
    assert ISO_MS.match(record.pop("timestamp"))
    assert record == {
        "version": "1.0",
        "requestContext": {
            "requestId": accepted.invocation_id,
            "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:sensor:$LATEST",
            "condition": "Success",
            "approximateInvokeCount": 1,
        },
        "requestPayload": event,
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST"},
        "responsePayload": {"attempt": 1},
    }


async def test_a_rerun_final_write_routes_its_outcome_once(tmp_path: Path):
    """The store reruns a batch op by op when one op fails: the destination is written once,
    and the store reports the child that was committed, not the rolled-back one."""
    lookup = {"src": fn("src", "ok", on_success="function:dst"), "dst": fn("dst", "ok")}.get
    now = time.time()

    def new(id: str) -> NewInvocation:
        return NewInvocation(
            id=id,
            function="src",
            function_version="$LATEST",
            trigger="test",
            invocation_type="async",
            event=b"{}",
            queued_at=now,
        )

    async with Store.open(tmp_path / "db" / "lambdaemon.db") as store:
        await store.insert(new("a"))
        await store.insert(new("taken"))
        router = Router(lookup)
        done = Outcome(
            status=Status.SUCCEEDED,
            payload=b'"ok"',
            started_at=now,
            ended_at=now,
            duration_ms=1.0,
            worker_pid=1,
        )
        reruns = store.reruns
        results = await asyncio.gather(
            store.settle("a", 1, done, router),
            store.insert(new("taken")),  # fails: the batch is rolled back and run op by op
            return_exceptions=True,
        )
        assert isinstance(results[0], Settled) and isinstance(results[1], sqlite3.IntegrityError)
        assert store.reruns - reruns == 1
        routed = results[0].routed
        assert routed is not None and routed.child is not None
        children = await store.query("SELECT id FROM invocations WHERE parent_id = 'a'")
        assert [r["id"] for r in children] == [routed.child.id]


async def test_on_failure_after_retries_exhausted_and_event_age(tmp_path: Path):
    failing = flaky("sensor", retries=1, on_failure="function:archive")
    # the first retry would come 2 s after a 1 s age limit: dead-lettered for its age
    aging = flaky(
        "aging",
        retries=2,
        retry_backoff_s=(2.0, 2.0),
        max_event_age_s=1.0,
        on_failure="function:archive",
        on_success="function:archive",
    )
    functions = (failing, aging, fn("archive", "echo"))
    async with dispatching(tmp_path / "db", *functions) as (dispatcher, store):
        calls = str(shared_folder(tmp_path) / "calls")
        exhausted = await dispatcher.accept(
            "sensor", {"dir": calls, "fail": ["raise", "exit"]}, trigger="test", trigger_id="t#0"
        )
        too_old = await dispatcher.accept(
            "aging", {"dir": calls, "fail": ["raise"]}, trigger="test", trigger_id="t#1"
        )
        assert await final(dispatcher, exhausted.invocation_id) == "crashed"
        assert await final(dispatcher, too_old.invocation_id) == "failed"
        records = [
            json.loads((await child_of(store, i.invocation_id))["event"])
            for i in (exhausted, too_old)
        ]
    first, second = records
    assert first["requestContext"]["condition"] == "RetriesExhausted"
    assert first["requestContext"]["approximateInvokeCount"] == 2
    assert first["responseContext"]["functionError"] == "Unhandled"
    assert first["responsePayload"]["errorType"].startswith("Runtime.")  # the worker exited
    assert second["requestContext"]["condition"] == "EventAgeExceeded"
    assert second["responsePayload"]["errorType"] == "RuntimeError"
    assert second["requestPayload"] == {"dir": calls, "fail": ["raise"]}


async def test_dead_letter_found_at_recovery_goes_to_on_failure(tmp_path: Path):
    db = tmp_path / "db"
    async with Store.open(db) as store:  # a daemon died during the only allowed attempt
        await store.insert(
            NewInvocation(
                id="interrupted",
                function="sensor",
                function_version="$LATEST",
                trigger="test",
                invocation_type="async",
                event=b'{"n": 1}',
                queued_at=time.time() - 5,
            )
        )
        await store.mark_running("interrupted", 1, time.time() - 4, None)
    functions = (flaky("sensor", retries=0, on_failure="function:archive"), fn("archive", "echo"))
    async with dispatching(db, *functions) as (dispatcher, store):
        child = await child_of(store, "interrupted")
        assert await final(dispatcher, child["id"]) == "succeeded"  # resumed like any queued row
    record = json.loads(child["event"])
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["responsePayload"]["errorType"] == "Lambdaemon.Interrupted"


async def test_self_triggering_chain_stops_after_16_hops(tmp_path: Path):
    loop = fn("loop", "ok", on_success="function:loop")
    async with dispatching(tmp_path / "db", loop) as (dispatcher, store):
        with capture_logs() as logs:
            root = await dispatcher.accept("loop", {}, trigger="test", trigger_id="t#0")
            invocation_id, chain = root.invocation_id, []
            for _ in range(MAX_HOPS + 1):  # the root and 16 hops run
                assert await final(dispatcher, invocation_id) == "succeeded"
                chain.append(invocation_id)
                invocation_id = (await child_of(store, invocation_id))["id"]
        stopped = await store.get(invocation_id)
        hops = [(await store.get(i) or {})["hops"] for i in chain]
    assert hops == list(range(MAX_HOPS + 1))
    # the 17th hop is not run: it is a dead letter, like Lambda's RecursiveInvocationException
    assert stopped is not None and stopped["attempts"] == []
    assert (stopped["status"], stopped["dead_letter_reason"], stopped["hops"]) == (
        "failed",
        "RecursiveInvocationException",
        MAX_HOPS + 1,
    )
    [line] = [e for e in logs if e["event"] == "invocation_chain_stopped"]
    assert (line["hops"], line["chain_root"], line["invocation_id"]) == (
        MAX_HOPS,
        root.invocation_id,
        chain[-1],
    )
    assert line["dead_letter_id"] == invocation_id


# --- mqtt: and webhook: through the outbox --------------------------------------------------------


async def test_mqtt_and_webhook_destinations_are_delivered(tmp_path: Path, broker: Mosquitto):
    async with receiving(Receiver()) as receiver:
        config = config_with(
            tmp_path,
            (
                f'[mqtt]\nurl = "{broker.url}"\nclient_id = "edge-1"\n'
                + fn_toml("alarm", retries=0, on_failure="mqtt:alerts/sensor")
                + fn_toml("notify", on_success=f"webhook:{receiver.url}")
            ),
        )
        v5 = {"protocol": V5, "identifier": "watcher"}
        async with aiomqtt.Client("127.0.0.1", broker.port, **v5) as watcher:  # type: ignore[arg-type]
            await watcher.subscribe("alerts/#", qos=1)
            with watch_logs() as logs:
                async with serving(config) as (dispatcher, store):
                    calls = str(shared_folder(tmp_path) / "calls")
                    alarm = await dispatcher.accept(
                        "alarm", {"dir": calls, "fail": ["raise"]}, trigger="test", trigger_id="t#0"
                    )
                    notify = await dispatcher.accept(
                        "notify", {"dir": calls}, trigger="test", trigger_id="t#1"
                    )
                    async with asyncio.timeout(15):
                        message = await anext(aiter(watcher.messages))
                        posted = await receiver.arrived.get()
                    await logs.wait_for("destination_delivered", kind="mqtt")
                    await logs.wait_for("destination_delivered", kind="webhook")
                    await store.barrier()  # their outbox writes were enqueued before the lines
                    assert not outbox_rows(config.data_dir / "lambdaemon.db")  # the outbox empties
    mqtt_record = json.loads(message.payload)  # type: ignore[arg-type]
    assert (str(message.topic), message.qos) == ("alerts/sensor", 1)
    assert mqtt_record["requestContext"]["requestId"] == alarm.invocation_id
    assert mqtt_record["requestContext"]["condition"] == "RetriesExhausted"
    assert dict(message.properties.UserProperty)["message-id"] == f"{alarm.invocation_id}:1"  # type: ignore[union-attr]
    assert posted["record"]["requestContext"]["requestId"] == notify.invocation_id
    assert posted["record"]["requestContext"]["condition"] == "Success"
    assert posted["headers"]["Idempotency-Key"] == f"{notify.invocation_id}:1"
    assert posted["headers"]["Content-Type"] == "application/json"
    delivered = [e for e in logs if e["event"] == "destination_delivered"]
    assert sorted(e["kind"] for e in delivered) == ["mqtt", "webhook"]
    [connected] = [e for e in logs if e["event"] == "mqtt_publisher_connected"]
    assert connected["client_id"] == "edge-1-out"  # never the subscriber's session


async def test_permanent_4xx_is_kept_as_failed_and_does_not_block_others(tmp_path: Path):
    rejecting = Receiver(lambda record: 422 if record["requestPayload"].get("reject") else 200)
    async with receiving(rejecting) as receiver:
        config = config_with(tmp_path, fn_toml("notify", on_success=f"webhook:{receiver.url}"))
        calls, ids = str(shared_folder(tmp_path) / "calls"), []
        async with serving(config, relay=False) as (dispatcher, _):  # both wait in the outbox
            for event in ({"dir": calls, "reject": True}, {"dir": calls}):
                accepted = await dispatcher.accept("notify", event, trigger="t", trigger_id="t#0")
                assert await final(dispatcher, accepted.invocation_id) == "succeeded"
                ids.append(accepted.invocation_id)
        db = config.data_dir / "lambdaemon.db"
        assert [r["invocation_id"] for r in outbox_rows(db)] == ids  # the refused one first
        with watch_logs() as logs:
            async with serving(config) as (_, store):
                # One record failed, the other delivered: each outbox write is enqueued first.
                await logs.wait_for("destination_failed", invocation_id=ids[0])
                await logs.wait_for("destination_delivered", invocation_id=ids[1])
                await store.barrier()
                rows = outbox_rows(db)
    [kept] = rows
    assert (kept["invocation_id"], kept["status"], kept["attempts"]) == (ids[0], "failed", 1)
    assert kept["last_error"] == "HTTP 422: not this one"
    assert [r["status"] for r in receiver.requests] == [422, 200]
    [failed] = [e for e in logs if e["event"] == "destination_failed"]
    assert (failed["log_level"], failed["invocation_id"]) == ("error", ids[0])
    [delivered] = [e for e in logs if e["event"] == "destination_delivered"]
    assert delivered["invocation_id"] == ids[1]


async def test_store_and_forward_across_sigkill_delivers_exactly_once(
    tmp_path: Path, broker: Mosquitto
):
    receiver = Receiver()  # not listening until the end
    session = {
        "identifier": "watcher",
        "protocol": V5,
        "clean_start": False,
        "properties": _session_expiry(3600),
    }
    async with aiomqtt.Client("127.0.0.1", broker.port, **session) as watcher:  # type: ignore[arg-type]
        await watcher.subscribe("alerts/#", qos=1)  # the broker keeps this session while away
    broker.stop()
    body = (
        f'[mqtt]\nurl = "{broker.url}"\nclient_id = "edge-1"\n'
        + fn_toml("alarm", retries=0, on_failure="mqtt:alerts/sensor")
        + fn_toml("notify", on_success=f"webhook:{receiver.url}")
    )
    daemon = Daemon(write_config(tmp_path, body))
    db = tmp_path / "var" / "lambdaemon.db"
    await daemon.start()  # with the broker down
    try:
        listed = {f["name"]: f for f in (await daemon.get("/v1/functions"))["functions"]}
        assert listed["alarm"]["on_failure"] == "mqtt:alerts/sensor"
        calls = str(shared_folder(tmp_path) / "calls")
        ids = [
            await _accept(daemon, "alarm", {"dir": calls, "fail": ["raise"]}),
            await _accept(daemon, "notify", {"dir": calls}),
        ]
        await daemon.wait_log("destination_retry", kind="mqtt")  # both targets tried
        await daemon.wait_log("destination_retry", kind="webhook")

        def stored() -> bool:  # destination_retry is logged before its attempt is committed
            rows = outbox_rows(db)
            return len(rows) == 2 and all(r["attempts"] >= 1 and r["last_error"] for r in rows)

        await daemon.wait_stored(stored, what="both failed attempts committed")
        await daemon.kill()
        pending = outbox_rows(db)
        # One row each; their order is the order the two concurrent functions finished in.
        assert sorted((r["invocation_id"], r["status"]) for r in pending) == sorted(
            [(ids[0], "pending"), (ids[1], "pending")]
        )
        assert all(r["attempts"] >= 1 and r["last_error"] for r in pending)

        await daemon.start()
        broker.start()
        async with receiving(receiver):
            await daemon.wait_stored(
                lambda: len(_events(daemon, "destination_delivered")) == 2 and not outbox_rows(db),
                what="both delivered",
            )
            await daemon.stop()
        async with aiomqtt.Client("127.0.0.1", broker.port, **session) as watcher:  # type: ignore[arg-type]
            # Our own message after the queued ones: when it arrives, every copy has arrived.
            await watcher.publish("alerts/sensor", b'"sentinel"', qos=1)
            copies = []
            async with asyncio.timeout(10):
                async for message in watcher.messages:
                    if message.payload == b'"sentinel"':
                        break
                    copies.append(json.loads(message.payload))  # type: ignore[arg-type]
    finally:
        await daemon.close()
    assert [c["requestContext"]["requestId"] for c in copies] == [ids[0]]
    assert [r["record"]["requestContext"]["requestId"] for r in receiver.requests] == [ids[1]]
    delivered = _events(daemon, "destination_delivered")
    assert sorted(e["outbox_id"] for e in delivered) == [r["id"] for r in pending]


def _session_expiry(seconds: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = seconds
    return props


def _events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


async def _accept(daemon: Daemon, name: str, event: Any) -> str:
    status, headers, _ = await daemon.invoke(name, event, kind="Event")
    assert status == 202
    return str(headers["x-amzn-RequestId"])
