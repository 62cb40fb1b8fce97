"""Shared subscriptions (`[mqtt] share_group`) against a real Mosquitto and real daemons.

What Mosquitto does with a dead member's messages is proven here with a member that is a real
process killed with SIGKILL; the daemons' tests count records in each daemon's own SQLite file
(tests/triggers/test_mqtt.py's helpers), so they hold whatever store the nodes share.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.config import load_config
from daemon.errors import ConfigError
from tests.daemon_proc import ROOT, Daemon, running_daemon, write_config
from tests.mosquitto import Mosquitto, running_broker
from tests.postgres import Postgres
from tests.triggers.test_mqtt import (
    AckDroppingProxy,
    count,
    mqtt_toml,
    publish,
    records,
    stored,
    subscribed,
)
from tests.waits import until, until_changed
from triggers.mqtt import BACKOFF_S, SESSION_TAKEN_OVER, _Client

GROUP = "fleet"


def node(tmp_path: Path, name: str, body: str) -> Daemon:
    folder = tmp_path / name
    folder.mkdir()
    return Daemon(write_config(folder, body))


def shared_toml(url: str, client_id: str, triggers: dict[str, list[tuple[str, int]]]) -> str:
    body = mqtt_toml(url, triggers, extra=f'share_group = "{GROUP}"')
    return body.replace('client_id = "lambdaemon-test"', f'client_id = "{client_id}"')


def numbers(daemon: Daemon, function: str) -> list[int]:
    return [r["event"]["payload"]["n"] for r in records(daemon, function)]


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["a/b", "a+", "#", "x\\u0000"])
def test_share_group_that_is_not_one_topic_level_is_a_config_error(
    tmp_path: Path, group: str
) -> None:
    body = mqtt_toml("mqtt://127.0.0.1:1883", {"temp": [("t/#", 1)]}, f'share_group = "{group}"')
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    assert info.value.key == "mqtt.share_group"
    assert "$share/<group>/<topic>" in info.value.reason


def test_topic_written_as_a_shared_subscription_with_share_group_is_a_config_error(
    tmp_path: Path,
) -> None:
    topics = [("t/#", 1), ("$share/other/t/+", 1)]
    body = mqtt_toml("mqtt://127.0.0.1:1883", {"temp": topics}, f'share_group = "{GROUP}"')
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    assert info.value.key == "functions.temp.triggers[1].topic"
    assert "give the plain topic" in info.value.reason
    # Without share_group, a trigger may still name a shared subscription of its own.
    assert load_config(write_config(tmp_path, body.replace(f'share_group = "{GROUP}"', "")))


def test_client_id_defaults_to_one_per_node_with_share_group(tmp_path: Path) -> None:
    body = mqtt_toml("mqtt://127.0.0.1:1883", {"temp": [("t/#", 1)]})
    unset = body.replace('client_id = "lambdaemon-test"\n', "")
    config = load_config(write_config(tmp_path, unset))
    assert config.mqtt is not None and config.mqtt.client_id == "lambdaemon"
    shared = unset.replace("[mqtt]\n", f'[mqtt]\nshare_group = "{GROUP}"\n')
    config = load_config(write_config(tmp_path, shared))
    assert config.mqtt is not None
    assert config.mqtt.client_id == f"lambdaemon-{socket.gethostname()}"  # the node id's default
    node = write_config(tmp_path, shared, daemon='node_id = "edge-7"')
    config = load_config(node)
    assert config.mqtt is not None and config.mqtt.client_id == "lambdaemon-edge-7"
    named = body.replace("[mqtt]\n", '[mqtt]\nshare_group = "g"\n')
    config = load_config(write_config(tmp_path, named))
    assert config.mqtt is not None and config.mqtt.client_id == "lambdaemon-test"  # as set


# --- what Mosquitto does with a dead member's messages ----------------------------------------

# A member that takes QoS 1 messages and never acks them, printing each payload; SIGKILLed.
_MEMBER = r"""
import sys
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="a", protocol=mqtt.MQTTv5)
client.manual_ack_set(True)
client.on_message = lambda c, u, m: print(m.payload.decode(), flush=True)
client.on_subscribe = lambda *a: print("subscribed", flush=True)
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval = 3600
client.connect("127.0.0.1", int(sys.argv[1]), clean_start=False, properties=props)
client.subscribe(sys.argv[2], qos=1)
client.loop_forever()
"""


class Member:
    """An in-process member with a persistent session that acks what it gets: (payload, dup)."""

    def __init__(self, port: int, client_id: str, topic: str, arrived: asyncio.Event) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client = _Client(  # the source's client: it keeps each message's DUP flag
            "127.0.0.1",
            port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
        )
        self.topic = topic
        self.got: list[tuple[str, bool]] = []
        self.arrived = arrived

    async def __aenter__(self) -> Member:
        await self.client.__aenter__()
        self._task = asyncio.create_task(self._take())
        await self.client.subscribe(self.topic, options=SubscribeOptions(qos=1))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await self.client.__aexit__(None, None, None)

    async def _take(self) -> None:
        async for message in self.client.messages:  # acked by paho as it is handed over
            assert isinstance(message.payload, bytes)
            self.got.append((message.payload.decode(), message.dup))  # type: ignore[attr-defined]
            self.arrived.set()


async def until_arrived(arrived: asyncio.Event, check: Callable[[], bool], what: str) -> None:
    """Return once `check()` holds, tried each time a member got a message; bounded."""
    try:
        async with asyncio.timeout(15):
            while not check():
                arrived.clear()
                await arrived.wait()
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_mosquitto_keeps_a_dead_members_messages_for_its_session(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Mosquitto (Debian's 2.0) never hands a shared subscription's message to another member:
    the messages a member got and did not ack stay with its session and come back, with DUP,
    when the same client id connects again; and while it is away the member keeps its turn, so
    part of what is published meanwhile is queued for it too. Nothing goes to the live member
    that was meant for the dead one."""
    topic = f"$share/{GROUP}/t/#"
    arrived = asyncio.Event()
    unacked: list[str] = []  # what the member to be killed got

    async def read(stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            unacked.append(line.decode().strip())
            arrived.set()

    dead = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MEMBER, str(mosquitto.port), topic, stdout=asyncio.subprocess.PIPE
    )
    assert dead.stdout is not None
    reader = None
    try:
        assert await asyncio.wait_for(dead.stdout.readline(), 15) == b"subscribed\n"
        reader = asyncio.create_task(read(dead.stdout))
        async with Member(mosquitto.port, "b", topic, arrived) as live:
            await publish(mosquitto.port, *((f"t/{i}", f"m{i}") for i in range(10)))
            await until_arrived(arrived, lambda: len(unacked) + len(live.got) == 10, "10 taken")
            assert unacked and live.got  # the group shares: each member has some
            dead.kill()  # SIGKILL: no DISCONNECT, its unacked messages still in flight
            await dead.wait()
            log = mosquitto.log_path
            await until_changed(log, lambda: "Client a closed" in log.read_text(), what="closed")

            await publish(mosquitto.port, *((f"t/{i}", f"m{i}") for i in range(10, 20)))
            everything = {f"m{i}" for i in range(20)}
            # The same client id again: its session, kept by the broker.
            async with Member(mosquitto.port, "a", topic, arrived) as back:
                await until_arrived(
                    arrived,
                    lambda: {p for p, _ in back.got + live.got} >= everything,
                    "all 20 messages",
                )
    finally:
        if dead.returncode is None:
            dead.kill()
            await dead.wait()
        if reader is not None:
            await reader
    redelivered = [p for p, dup in back.got if dup]
    assert sorted(redelivered) == sorted(unacked)  # held for its session, sent again with DUP
    assert not set(unacked) & {p for p, _ in live.got}  # never given to the live member
    queued_while_away = [p for p, dup in back.got if not dup]
    assert queued_while_away  # it kept its turn while it was away
    delivered = [p for p, _ in back.got + live.got]
    assert Counter(delivered) == Counter(everything)  # each to one member, once


async def test_mosquitto_drops_a_dead_members_turns_past_its_queue_limit(tmp_path: Path) -> None:
    """What the broker queues for a member that is away is bounded by max_queued_messages;
    past it, Mosquitto drops that member's turns (it logs so) rather than giving them to a
    live member, although the publisher got its PUBACK for each. Hence the advice to give the
    broker a large limit (docs/triggers.md)."""
    topic = f"$share/{GROUP}/t/#"
    arrived = asyncio.Event()
    with running_broker(tmp_path / "broker", extra_conf="max_queued_messages 5") as broker:
        dead = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _MEMBER, str(broker.port), topic, stdout=asyncio.subprocess.PIPE
        )
        assert dead.stdout is not None
        try:
            assert await asyncio.wait_for(dead.stdout.readline(), 15) == b"subscribed\n"
        finally:
            dead.kill()
            await dead.wait()
        log = broker.log_path
        await until_changed(log, lambda: "Client a closed" in log.read_text(), what="closed")
        async with Member(broker.port, "b", topic, arrived) as live:
            await publish(broker.port, *((f"t/{i}", f"m{i}") for i in range(40)))
            await until_arrived(arrived, lambda: len(live.got) == 20, "the live member's half")
            assert "Outgoing messages are being dropped for client a" in log.read_text()
            async with Member(broker.port, "a", topic, arrived) as back:
                await until_arrived(arrived, lambda: len(back.got) == 5, "the queued five")
    taken = {p for p, _ in live.got + back.got}
    assert len(taken) == 25  # 40 published and acknowledged; 15 dropped


# --- daemons in a share group ------------------------------------------------------------------


async def test_two_daemons_in_a_share_group_handle_each_message_once_between_them(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # Overlapping filters are two shared subscriptions: each trigger gets every message once,
    # routed by the subscription's identifier on whichever node the broker chose.
    triggers = {"temp": [("sensors/+/temp", 1)], "everything": [("sensors/#", 1)]}
    a = node(tmp_path, "a", shared_toml(mosquitto.url, "node-a", triggers))
    b = node(tmp_path, "b", shared_toml(mosquitto.url, "node-b", triggers))
    total = 400
    try:
        await asyncio.gather(a.start(), b.start())
        await asyncio.gather(subscribed(a, 2), subscribed(b, 2))
        logged = [e["topic"] for e in a.log_events() if e.get("event") == "mqtt_subscribed"]
        assert sorted(logged) == [f"$share/{GROUP}/sensors/#", f"$share/{GROUP}/sensors/+/temp"]
        await publish(mosquitto.port, *(("sensors/x/temp", f'{{"n": {i}}}') for i in range(total)))
        await stored(a, lambda: count(a) + count(b) >= 2 * total, "every record", timeout_s=30)
        # A publisher's message-id is keyed by the group, not the node: the same on any node.
        await publish(mosquitto.port, ("sensors/id/temp", '{"n": -1}'), user={"message-id": "x"})
        await stored(a, lambda: count(a) + count(b) >= 2 * total + 2, "the keyed message")
    finally:
        await asyncio.gather(a.close(), b.close())
    keyed = [r for d in (a, b) for r in records(d) if r["event"]["payload"] == {"n": -1}]
    assert (
        sorted(r["dedupe_key"].rsplit(":", 2)[0] for r in keyed)
        == [f"mqtt:%24share%2F{GROUP}:id"] * 2
    )
    for function in triggers:
        mine = [n for n in numbers(a, function) if n >= 0]
        theirs = [n for n in numbers(b, function) if n >= 0]
        assert mine and theirs  # the broker gave each node some
        assert sorted(mine + theirs) == list(range(total))  # and each message to one of them
    for daemon in (a, b):
        assert not [e for e in daemon.log_events() if e.get("event") == "mqtt_message_rejected"]


async def test_a_node_killed_mid_stream_loses_nothing_once_it_is_back(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    triggers = {"temp": [("sensors/+/temp", 1)]}
    a = node(tmp_path, "a", shared_toml(mosquitto.url, "node-a", triggers))
    b = node(tmp_path, "b", shared_toml(mosquitto.url, "node-b", triggers))
    total = 1200
    try:
        await asyncio.gather(a.start(), b.start())
        await asyncio.gather(subscribed(a), subscribed(b))
        publisher = asyncio.create_task(
            publish(mosquitto.port, *(("sensors/x/temp", f'{{"n": {i}}}') for i in range(total)))
        )
        # Killed with commits and unacked messages in flight; what the broker held for its
        # session (unacked, and its turns while it was down) comes back when it restarts.
        await stored(a, lambda: count(a) >= 150, "150 records on node a")
        await a.kill()
        await stored(b, lambda: count(b) >= 600, "node b carrying on", timeout_s=30)
        await a.start()
        await asyncio.wait_for(publisher, 30)
        await stored(a, lambda: count(a) + count(b) >= total, "every record", timeout_s=30)
    finally:
        await asyncio.gather(a.close(), b.close())
    mine, theirs = numbers(a, "temp"), numbers(b, "temp")
    assert mine and theirs
    assert sorted(mine + theirs) == list(range(total))  # none lost, none twice


async def test_a_stand_in_with_a_dead_nodes_client_id_drains_its_session(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A node that does not come back: a daemon elsewhere with its client id and
    session_expiry_s = 0 takes over the session, commits what the broker held for it, and
    ends the session as it stops, so the group is the live nodes again."""
    triggers = {"temp": [("sensors/+/temp", 1)]}
    a = node(tmp_path, "a", shared_toml(mosquitto.url, "node-a", triggers))
    b = node(tmp_path, "b", shared_toml(mosquitto.url, "node-b", triggers))
    stand_in = shared_toml(mosquitto.url, "node-a", triggers)
    c = node(tmp_path, "c", stand_in.replace("[mqtt]\n", "[mqtt]\nsession_expiry_s = 0\n"))
    total, after = 600, 50
    try:
        await asyncio.gather(a.start(), b.start())
        await asyncio.gather(subscribed(a), subscribed(b))
        first = 100
        await publish(mosquitto.port, *(("sensors/x/temp", f'{{"n": {i}}}') for i in range(first)))
        await stored(a, lambda: count(a) + count(b) >= first, "the first ones")
        await a.kill()  # and never started again
        # The broker keeps node-a's turns: part of these is queued for its session.
        publisher = asyncio.create_task(
            publish(
                mosquitto.port,
                *(("sensors/x/temp", f'{{"n": {i}}}') for i in range(first, total)),
            )
        )
        await stored(b, lambda: count(b) >= 150, "node b carrying on")
        await asyncio.wait_for(publisher, 30)
        await c.start()
        await subscribed(c)

        def recorded() -> set[int]:
            return {n for d in (a, b, c) for n in numbers(d, "temp")}

        await stored(c, lambda: recorded() >= set(range(total)), "every record", timeout_s=30)
        await c.stop()  # session expiry 0: the broker drops node-a's session
        await publish(
            mosquitto.port, *(("sensors/x/temp", f'{{"n": {total + i}}}') for i in range(after))
        )
        later = set(range(total, total + after))
        await stored(b, lambda: set(numbers(b, "temp")) >= later, "the later ones, all on b")
    finally:
        await asyncio.gather(a.close(), b.close(), c.close())
    counts = Counter(n for d in (a, b, c) for n in numbers(d, "temp"))
    assert set(counts) == set(range(total + after))  # none lost
    assert numbers(c, "temp")  # the stand-in had something to do
    # Twice only where node a had committed a message and died before its PUBACK: the
    # stand-in, on a store of its own, cannot know and records it again (at least once).
    twice = {n for n, times in counts.items() if times > 1}
    assert twice <= set(numbers(a, "temp")) & set(numbers(c, "temp"))
    assert max(counts.values()) <= 2


async def test_a_live_node_drains_a_dead_nodes_session(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """POST /v1/mqtt/drain (`lambdaemon mqtt-drain`): a live node takes over the session of a
    node that will not come back, stores what the broker held for it, and leaves it
    unsubscribed, so what comes next goes to the live nodes only."""
    triggers = {"temp": [("sensors/+/temp", 1)]}
    a = node(tmp_path, "a", shared_toml(mosquitto.url, "node-a", triggers))
    b = node(tmp_path, "b", shared_toml(mosquitto.url, "node-b", triggers))
    total, after = 400, 40

    def message(i: int) -> tuple[str, str]:
        return ("sensors/x/temp", f'{{"n": {i}}}')

    try:
        await asyncio.gather(a.start(), b.start())
        await asyncio.gather(subscribed(a), subscribed(b))
        await publish(mosquitto.port, *map(message, range(100)))
        await stored(a, lambda: count(a) + count(b) >= 100, "the first ones")
        await a.kill()  # and never started again: its turns are queued for its session
        await publish(mosquitto.port, *map(message, range(100, total)))
        assert b.session is not None
        drain = f"{b.base}/v1/mqtt/drain"
        async with b.session.post(drain, json={"client_id": "node-a"}) as resp:
            assert resp.status == 200, await resp.text()
            report = await resp.json()
        assert report["client_id"] == "node-a" and report["session_present"] is True
        assert report["messages"] > 0

        def recorded() -> set[int]:
            return {n for d in (a, b) for n in numbers(d, "temp")}

        await stored(b, lambda: recorded() >= set(range(total)), "every record")
        await publish(mosquitto.port, *map(message, range(total, total + after)))
        later = set(range(total, total + after))
        await stored(b, lambda: set(numbers(b, "temp")) >= later, "the later ones, all on b")

        # Again, from the command line: the session is there, and empty.
        command = [sys.executable, "-m", "daemon.cli", "mqtt-drain", "node-a"]
        done = await asyncio.to_thread(
            functools.partial(subprocess.run, capture_output=True, text=True, cwd=ROOT, timeout=60),
            [*command, "--config", str(b.config)],
        )
        assert (done.returncode, done.stdout) == (0, "node-a: drained, 0 messages taken\n")
        async with b.session.post(drain, json={"client_id": "node-b"}) as resp:
            assert resp.status == 400
            assert "this daemon's own client id" in (await resp.json())["error"]
        async with b.session.post(drain, json={"client": "x"}) as resp:
            assert resp.status == 400
    finally:
        await asyncio.gather(a.close(), b.close())
    counts = Counter(n for d in (a, b) for n in numbers(d, "temp"))
    assert set(counts) == set(range(total + after))  # none lost
    # Twice only if node a died between a commit and its PUBACK (b's store is its own).
    twice = {n for n, times in counts.items() if times > 1}
    assert twice <= set(numbers(a, "temp")) and max(counts.values()) <= 2
    drained = [e for e in b.log_events() if e.get("event") == "mqtt_drained"]
    assert [e["messages"] for e in drained] == [report["messages"], 0]


# --- one client id on two daemons --------------------------------------------------------------


async def test_two_daemons_with_one_client_id_say_so_and_back_off(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = mqtt_toml(mosquitto.url, {"temp": [("sensors/+/temp", 1)]})  # both "lambdaemon-test"
    a, b = node(tmp_path, "a", body), node(tmp_path, "b", body)
    try:
        await a.start()
        await subscribed(a)
        await b.start()
        # Each connect of one ends the other's connection (Mosquitto 2.0 without a reason
        # code): each says so, and waits longer each time instead of taking it back at once.
        taken = await a.wait_log("mqtt_session_taken_over", 2, timeout_s=30)
        await b.wait_log("mqtt_session_taken_over", timeout_s=30)
    finally:
        await asyncio.gather(a.close(), b.close())
    assert all(e["client_id"] == "lambdaemon-test" and e["level"] == "error" for e in taken)
    assert "another daemon using client id 'lambdaemon-test'" in taken[0]["reason"]
    # The first error comes with the third short connection in a row, after two waits that
    # were not reset by the connects between them; reset, a wait is at most BACKOFF_S[0].
    assert taken[0]["retry_in_s"] > BACKOFF_S[0]
    assert taken[1]["retry_in_s"] > 2 * BACKOFF_S[0]


async def test_a_broker_saying_session_taken_over_is_logged_at_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # Brokers other than Mosquitto 2.0 say why: a v5 DISCONNECT with reason 0x8E, sent here by
    # a proxy in front of the real broker.
    async with AckDroppingProxy(mosquitto.port) as proxy:
        body = mqtt_toml(f"mqtt://127.0.0.1:{proxy.port}", {"temp": [("sensors/+/temp", 1)]})
        async with running_daemon(tmp_path, body) as daemon:
            await subscribed(daemon)
            proxy.disconnect(SESSION_TAKEN_OVER)
            (taken,) = await daemon.wait_log("mqtt_session_taken_over")
            await subscribed(daemon, 2)  # and it connects again
    assert "reason 0x8E (session taken over)" in taken["reason"]
    assert "client id 'lambdaemon-test'" in taken["reason"]


# --- on one PostgreSQL store (the fleet) -------------------------------------------------------


def pg_node(tmp_path: Path, name: str, body: str, cluster: Postgres, database: str) -> Daemon:
    folder = tmp_path / name
    folder.mkdir()
    store = (
        f'\n[store]\nurl = "{cluster.url(database)}"\n'
        f'password_file = "{cluster.password_file}"\nlease_s = 2\n'
    )
    return Daemon(write_config(folder, body + store, daemon=f'node_id = "{name}"'))


def pg_numbers(cluster: Postgres, database: str) -> list[int]:
    with cluster.connect(database) as conn:
        rows = conn.execute("SELECT event FROM invocations WHERE trigger = 'mqtt'").fetchall()
    return [json.loads(bytes(event))["payload"]["n"] for (event,) in rows]


async def test_on_a_shared_store_a_drain_finds_what_the_dead_node_committed(
    pg_cluster: Postgres, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Node a commits its messages but its PUBACKs never reach the broker (a proxy drops them),
    as if it died between each commit and its PUBACK; then it dies. Node b drains its session:
    the broker redelivers all of them, and each maps to the record node a committed, in the
    store they share: one record per message across the fleet."""
    database = pg_cluster.create_database()
    triggers = {"temp": [("sensors/+/temp", 1)]}
    total = 100
    async with AckDroppingProxy(mosquitto.port) as proxy:
        proxy.drop_acks = True
        through_proxy = f"mqtt://127.0.0.1:{proxy.port}"
        a = pg_node(
            tmp_path, "a", shared_toml(through_proxy, "node-a", triggers), pg_cluster, database
        )
        b = pg_node(
            tmp_path, "b", shared_toml(mosquitto.url, "node-b", triggers), pg_cluster, database
        )
        try:
            await asyncio.gather(a.start(timeout_s=40), b.start(timeout_s=40))
            await asyncio.gather(subscribed(a), subscribed(b))
            await publish(
                mosquitto.port, *(("sensors/x/temp", f'{{"n": {i}}}') for i in range(total))
            )

            def committed() -> bool:
                return len(pg_numbers(pg_cluster, database)) >= total

            await stored(a, committed, "every message committed")
            with pg_cluster.connect(database) as conn:
                sql = "SELECT count(*) FROM invocations WHERE trigger = 'mqtt' AND node = 'a'"
                (mine,) = conn.execute(sql).fetchone()
            assert mine > 0
            await proxy.acks(dropped=mine, what="node a's PUBACKs, dropped")
            await a.kill()
            assert b.session is not None
            drain = f"{b.base}/v1/mqtt/drain"
            async with b.session.post(drain, json={"client_id": "node-a"}) as resp:
                assert resp.status == 200, await resp.text()
                report = await resp.json()
        finally:
            await asyncio.gather(a.close(), b.close())
    assert report["messages"] == mine  # every one of them came back
    matched = [e for e in b.log_events() if e.get("event") == "mqtt_redelivery_matched"]
    assert len(matched) == report["messages"]
    assert sorted(pg_numbers(pg_cluster, database)) == list(range(total))  # once each


async def test_three_nodes_on_one_store_lose_nothing_under_kill_9(
    pg_cluster: Postgres, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Three nodes on one database and one share group, client ids left to their default
    (lambdaemon-<node id>); nodes killed with kill -9 while messages stream in, and started
    again: every message has exactly one record in the store, and each ends succeeded."""
    database = pg_cluster.create_database()
    body = shared_toml(mosquitto.url, "unset", {"temp": [("sensors/+/temp", 1)]})
    body = body.replace('client_id = "unset"\n', "")
    nodes = [pg_node(tmp_path, name, body, pg_cluster, database) for name in "abc"]
    total = 1500

    def final() -> list[tuple[str, str]]:
        with pg_cluster.connect(database) as conn:
            sql = "SELECT status, node FROM invocations WHERE trigger = 'mqtt'"
            return [(str(s), str(n)) for s, n in conn.execute(sql).fetchall()]

    try:
        await asyncio.gather(*(d.start(timeout_s=40) for d in nodes))
        await asyncio.gather(*(subscribed(d) for d in nodes))
        for d in nodes:
            connected = [e for e in d.log_events() if e.get("event") == "mqtt_connected"]
            assert connected[0]["client_id"] == f"lambdaemon-{d.config.parent.name}"
        publisher = asyncio.create_task(
            publish(mosquitto.port, *(("sensors/x/temp", f'{{"n": {i}}}') for i in range(total)))
        )
        for at, victim in ((300, nodes[0]), (800, nodes[2])):
            # The store is read from outside the daemons: polled, bounded.
            await until(lambda at=at: len(final()) >= at, 30, f"{at} records")
            await victim.kill()
            await victim.start(timeout_s=40)
        await asyncio.wait_for(publisher, 60)
        await until(
            lambda: len(final()) >= total and all(s == "succeeded" for s, _ in final()),
            60,
            "every record succeeded",
        )
    finally:
        await asyncio.gather(*(d.close() for d in nodes))
    assert sorted(pg_numbers(pg_cluster, database)) == list(range(total))
    assert {n for _, n in final()} == {"a", "b", "c"}


def unfinished(cluster: Postgres, database: str) -> int:
    with cluster.connect(database) as conn:
        sql = "SELECT count(*) FROM invocations WHERE status IN ('queued', 'running')"
        return int(conn.execute(sql).fetchone()[0])


async def test_a_fleet_drains_a_dead_nodes_session_by_itself(
    pg_cluster: Postgres, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """On one store with default client ids, once a node's lease has run out the first live
    node by id drains its session: what the broker held for it is stored without anyone
    asking, and the later messages go to the live nodes only."""
    database = pg_cluster.create_database()
    body = shared_toml(mosquitto.url, "unset", {"temp": [("sensors/+/temp", 1)]})
    body = body.replace('client_id = "unset"\n', "")
    a, b, c = (pg_node(tmp_path, name, body, pg_cluster, database) for name in "abc")

    def message(i: int) -> tuple[str, str]:
        return ("sensors/x/temp", f'{{"n": {i}}}')

    def numbers_stored() -> set[int]:
        return set(pg_numbers(pg_cluster, database))

    try:
        await asyncio.gather(*(d.start(timeout_s=40) for d in (a, b, c)))
        await asyncio.gather(*(subscribed(d) for d in (a, b, c)))
        await c.kill()  # and never started again
        await publish(mosquitto.port, *map(message, range(300)))  # a third queued for c
        drained = await a.wait_log("mqtt_drained", client_id="lambdaemon-c", timeout_s=30)
        assert drained[0]["messages"] > 0
        # The store is read from outside the daemons: polled, bounded.
        await until(lambda: numbers_stored() >= set(range(300)), 30, "every message stored")
        await publish(mosquitto.port, *map(message, range(300, 360)))
        await until(lambda: numbers_stored() >= set(range(360)), 30, "the later ones")
        # and run: a row a node released for another to run has no node until one takes it
        await until(lambda: not unfinished(pg_cluster, database), 30, "every message run")
    finally:
        await asyncio.gather(a.close(), b.close(), c.close())
    assert sorted(pg_numbers(pg_cluster, database)) == list(range(360))  # once each
    assert not [e for e in b.log_events() if e.get("event") == "mqtt_drained"]  # a only
    with pg_cluster.connect(database) as conn:
        rows = conn.execute("SELECT event, node FROM invocations WHERE trigger = 'mqtt'")
        later = {node for event, node in rows if json.loads(bytes(event))["payload"]["n"] >= 300}
    assert later == {"a", "b"}  # c's session, drained and unsubscribed, gets no turn
