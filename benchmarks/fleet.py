"""The fleet: one daemon on PostgreSQL against one on SQLite (async intake), async intake with
one, two and three nodes on one PostgreSQL store, the time until a dead node's work runs on
another, and MQTT on a shared subscription with one, two and three nodes.

    .venv/bin/python benchmarks/fleet.py [--seconds 5] [--connections 32] [--rounds 3]
        [--concurrency 4]
    .venv/bin/python benchmarks/fleet.py --part mqtt [--store sqlite|postgresql]
        [--messages 5000] [--rounds 3] [--concurrency 4]
    .venv/bin/python benchmarks/fleet.py --part nodes [--seconds 5] [--connections 32]
        [--rounds 3] [--concurrency 4]
    .venv/bin/python benchmarks/fleet.py --part takeover [--lease-s 5] [--held 8] [--rounds 3]

Two daemons with the same function (a no-op, `concurrency` warm workers) run side by side: one
on its SQLite file, one with [store] url on a private PostgreSQL cluster (tests/postgres.py)
started durable, fsync and full page writes on, as a real server runs; the SQLite store is
durable too (synchronous=FULL for what is acknowledged). Each round loads one daemon's Invoke
API with `InvocationType=Event` (a 202 only once the event is committed), waits until every
event it accepted has its final record, then does the same to the other: the two alternate,
as this shared machine's speed drifts. The ratio is PostgreSQL's accepted events per second
over SQLite's in the round beside it: median, min and max. Target: >= 0.5x.

Also per round: the drain rate (events run to their final record per second, from the daemon's
own queued_at and ended_at) and each daemon's CPU per event (loop, threads, workers), and for
PostgreSQL the server's processes' CPU per event. Writes benchmarks/results/fleet.json.

`--part nodes`: one, two and three nodes on one PostgreSQL database (the durable cluster), the
order turned each round. A round starts k nodes, loads their Invoke APIs together with `Event`
calls (`--connections` split among them), waits until every accepted event has its final
record, and stops them. Figures: accepted events per second in all, events per second of the
nodes' CPU together (loop, threads, workers: on these 2 cores more nodes share the same CPU)
and of the server's, each node's share. Writes benchmarks/results/fleet-nodes.json.

`--part takeover`: two nodes on one PostgreSQL database, [store] lease_s = `--lease-s`. Node a
(concurrency 1) is given `--held` events of a handler that sleeps 0.2 s and is killed with kill
-9 once the first has started; node b (concurrency `--held`, idle) takes them over. The figure
is the time from the kill to the first of them starting on b (its attempt's started_at on b),
against the target of lease_s + 1 s; then a starts again for the next round. Writes
benchmarks/results/fleet-takeover.json.

`--part mqtt`: three daemons (nodes) with the no-op on one trigger, `[mqtt] share_group` set,
each with its own client id and its own SQLite file (or, with `--store postgresql`, all on one
database of a private durable cluster, each with its node_id), one private Mosquitto. A round
starts 1, 2 or 3 of them (the order turned each round, as the machine's speed drifts), publishes
`--messages` QoS 1 messages as fast as the broker acknowledges them, waits until every one has
its succeeded record on some node, and stops them (session expiry 0, so a stopped node leaves
the group). Figures: messages per second (first publish to last record), the messages per
second of CPU the nodes used together (loop, threads and workers: on these 2 cores, more nodes
share the same CPU, so this says what a node costs), each node's share, and every message's
record checked for exactly one across the nodes; on PostgreSQL also the server's CPU per
message. Writes benchmarks/results/fleet-mqtt.json (fleet-mqtt-postgresql.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cpu_delta, cpu_of, loadgen, machine_share, report  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402
from tests.mosquitto import Mosquitto  # noqa: E402
from tests.postgres import Postgres  # noqa: E402

FINAL = ("succeeded", "failed", "timed_out", "crashed")
_COUNTS = (
    "SELECT count(*), count(*) FILTER (WHERE status IN (?, ?, ?, ?)) FROM invocations"
    " WHERE trigger = 'api' AND invocation_type = 'async'"
)
_TIMES = (
    "SELECT queued_at, ended_at, status FROM invocations WHERE trigger = 'api'"
    " AND invocation_type = 'async' ORDER BY queued_at OFFSET ?"
)


def config(concurrency: int) -> str:
    return (
        f'[functions.noop]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
        f"concurrency = {concurrency}\nmin_warm = {concurrency}\n"
    )


def sqlite_reader(db: Path) -> Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]:
    def run(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(sql.replace("OFFSET", "LIMIT -1 OFFSET"), params).fetchall()

    return run


def pg_reader(cluster: Postgres, database: str) -> Callable[..., list[tuple[Any, ...]]]:
    def run(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with cluster.connect(database) as conn:
            return list(conn.execute(sql.replace("?", "%s"), params).fetchall())

    return run


async def drained(read: Callable[..., list[tuple[Any, ...]]], timeout_s: float = 300) -> int:
    async with asyncio.timeout(timeout_s):
        while True:
            ((rows, final),) = await asyncio.to_thread(read, _COUNTS, FINAL)
            if rows == final:
                return int(rows)
            await asyncio.sleep(0.02)  # polling the store from outside the daemon, bounded


def server_cpu(cluster: Postgres | None) -> float:
    """CPU seconds of every process of the cluster so far (its postmaster's children)."""
    if cluster is None:
        return 0.0
    pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for task in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a backend that ended meanwhile
        total += (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks
    return total


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out += [int(c) for c in children]
    return out


async def round_of(
    daemon: Daemon, read: Callable[..., list[tuple[Any, ...]]], cluster: Postgres | None, args
) -> dict:
    before = await drained(read)
    cpu, server = cpu_of(daemon.proc.pid), server_cpu(cluster)
    url = f"{daemon.base}/2015-03-31/functions/noop/invocations"
    headers = {"X-Amz-Invocation-Type": "Event"}
    load = await asyncio.to_thread(loadgen, url, args.connections, args.seconds, "{}", headers)
    await drained(read)
    after, server_after = cpu_of(daemon.proc.pid), server_cpu(cluster)
    rows = await asyncio.to_thread(read, _TIMES, (before,))
    queued = [q for q, _, _ in rows]
    ended = [e for _, e, _ in rows if e is not None]
    figures = {
        "rps": load["rps"],
        "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"],
        "errors": load["errors"],
        "events": len(rows),
        "succeeded": sum(s == "succeeded" for _, _, s in rows),
        "drain_per_s": round(len(rows) / (max(ended) - min(queued)), 1),
        "cpu_us_per_event": cpu_delta(cpu, after, len(rows)),
    }
    if cluster is not None:
        figures["server_cpu_us_per_event"] = round((server_after - server) * 1e6 / len(rows), 1)
    return figures


def summary(rounds: list[dict]) -> dict:
    keep = ("rps", "p50_ms", "p99_ms", "drain_per_s")
    out: dict = {key: round(statistics.median(r[key] for r in rounds), 2) for key in keep}
    out["not_succeeded"] = sum(r["events"] - r["succeeded"] for r in rounds)
    out["errors"] = sum(r["errors"] for r in rounds)
    out["cpu_us_per_event"] = {
        part: round(statistics.median(r["cpu_us_per_event"][part] for r in rounds), 1)
        for part in rounds[0]["cpu_us_per_event"]
    }
    if "server_cpu_us_per_event" in rounds[0]:
        out["server_cpu_us_per_event"] = round(
            statistics.median(r["server_cpu_us_per_event"] for r in rounds), 1
        )
    out["rounds"] = rounds
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


# --- MQTT on a shared subscription: 1, 2 and 3 nodes ----------------------------------------

MQTT_TOPIC = "bench/fleet"


def mqtt_node(broker: Mosquitto, name: str, concurrency: int) -> str:
    """A node's config: the no-op on a shared subscription. Session expiry 0, so a stopped
    node leaves the group (Mosquitto keeps giving an expired-later session its turns)."""
    return (
        f'[mqtt]\nurl = "{broker.url}"\nclient_id = "bench-{name}"\nshare_group = "bench"\n'
        f"session_expiry_s = 0\n{config(concurrency)}"
        f'[[functions.noop.triggers]]\ntype = "mqtt"\ntopic = "{MQTT_TOPIC}"\nqos = 1\n'
    )


_MQTT_DONE = "SELECT count(*) FROM invocations WHERE trigger = 'mqtt' AND status = 'succeeded'"
_MQTT_EVENTS = "SELECT event FROM invocations WHERE trigger = 'mqtt'"


class NodeFiles:
    """Each node's own SQLite file (tmp/<node>/var/lambdaemon.db)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def body(self, name: str) -> str:
        return ""

    def succeeded(self, names: list[str]) -> list[int]:
        return [int(self._read(name, _MQTT_DONE)[0][0]) for name in names]

    def seqs(self, names: list[str]) -> list[int]:
        rows = [row for name in names for row in self._read(name, _MQTT_EVENTS)]
        return [json.loads(event)["payload"]["seq"] for (event,) in rows]

    def _read(self, name: str, sql: str) -> list[Any]:
        db = self.tmp / name / "var" / "lambdaemon.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(sql).fetchall()


class SharedPostgres:
    """One PostgreSQL database for every node; a record's `node` is the node that took it."""

    def __init__(self, cluster: Postgres, database: str) -> None:
        self.cluster, self.database = cluster, database

    def body(self, name: str) -> str:
        return (
            f'\n[store]\nurl = "{self.cluster.url(self.database)}"\n'
            f'password_file = "{self.cluster.password_file}"\n'
        )

    def succeeded(self, names: list[str]) -> list[int]:
        sql = _MQTT_DONE.replace("count(*)", "node, count(*)") + " GROUP BY node"
        with self.cluster.connect(self.database) as conn:
            by_node = dict(conn.execute(sql).fetchall())
        return [int(by_node.get(name, 0)) for name in names]

    def seqs(self, names: list[str]) -> list[int]:
        with self.cluster.connect(self.database) as conn:
            rows = conn.execute(_MQTT_EVENTS).fetchall()
        return [json.loads(bytes(event))["payload"]["seq"] for (event,) in rows]


async def mqtt_round(
    broker: Mosquitto,
    nodes: list[tuple[Daemon, str]],
    store: NodeFiles | SharedPostgres,
    messages: int,
    first: int,
) -> dict:
    """Start `nodes`, publish `messages` QoS 1 messages, wait for every one's final record
    across them, stop them. Rate: messages over first publish to last record."""
    names = [name for _, name in nodes]
    marks = [d.log_mark() for d, _ in nodes]
    await asyncio.gather(*(d.start(timeout_s=40) for d, _ in nodes))
    try:
        await asyncio.gather(
            *(
                d.wait_log("mqtt_subscribed", since=m)
                for (d, _), m in zip(nodes, marks, strict=True)
            )
        )
        before = await asyncio.to_thread(store.succeeded, names)
        cpu = [cpu_of(d.proc.pid) for d, _ in nodes]
        server = server_cpu(store.cluster) if isinstance(store, SharedPostgres) else 0.0
        started = time.perf_counter()
        published = await asyncio.to_thread(publish_qos1, broker.port, messages, first)
        async with asyncio.timeout(600):
            while True:  # the records are read from outside the daemons: polled, bounded
                done = await asyncio.to_thread(store.succeeded, names)
                if sum(done) - sum(before) >= messages:
                    break
                await asyncio.sleep(0.02)
        seconds = time.perf_counter() - started
        after = [cpu_of(d.proc.pid) for d, _ in nodes]
        if isinstance(store, SharedPostgres):
            server = server_cpu(store.cluster) - server
    finally:
        await asyncio.gather(*(d.stop() for d, _ in nodes))
    cpu_s = [
        sum(a[part] - b[part] for part in ("loop", "threads", "children"))
        for b, a in zip(cpu, after, strict=True)
    ]
    return {
        "nodes": len(nodes),
        "msgs_per_s": round(messages / seconds, 1),
        # The broker's acks to the publisher: near msgs_per_s, the publisher set the pace.
        "published_per_s": round(messages / (published - started), 1),
        "per_node": [d - b for d, b in zip(done, before, strict=True)],
        "node_cpu_s": [round(c, 3) for c in cpu_s],
        "msgs_per_node_cpu_s": round(messages / sum(cpu_s), 1),
        # PostgreSQL's processes, on the same cores (0 with a file per node).
        "server_cpu_us_per_message": round(server * 1e6 / messages, 1),
        "machine": machine_share(cpu[0], after[0]),
    }


def publish_qos1(port: int, count: int, first: int) -> float:
    """`count` QoS 1 messages as fast as the broker acknowledges them, each with its number;
    the perf_counter time of the last acknowledgement."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-fleet-publisher")
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payloads = (json.dumps({"seq": i}) for i in range(first, first + count))
    infos = [client.publish(MQTT_TOPIC, payload, qos=1) for payload in payloads]
    for info in infos:
        info.wait_for_publish(120)
    finished = time.perf_counter()
    client.loop_stop()
    client.disconnect()
    return finished


async def mqtt_fleet(args: argparse.Namespace) -> dict:
    """Rounds of 1, 2 and 3 nodes (order turned each round) on one shared subscription, each
    node on its own SQLite file, or (--store postgresql) all on one PostgreSQL database."""
    rounds: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    names = ["node1", "node2", "node3"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        broker = Mosquitto(Path(tmp) / "broker")
        broker.start()
        stack.callback(broker.close)
        store: NodeFiles | SharedPostgres = NodeFiles(Path(tmp))
        if args.store == "postgresql":
            cluster = Postgres(durable=True)
            cluster.start()
            stack.callback(cluster.stop)
            store = SharedPostgres(cluster, cluster.create_database())
        nodes = []
        for name in names:
            folder = Path(tmp) / name
            folder.mkdir()
            body = mqtt_node(broker, name, args.concurrency) + store.body(name)
            daemon = "max_workers = 8" + (f'\nnode_id = "{name}"' if store.body(name) else "")
            nodes.append((Daemon(write_config(folder, body, daemon=daemon)), name))
        for n in range(args.rounds):
            order = [1, 2, 3][n % 3 :] + [1, 2, 3][: n % 3]
            for k in order:
                first = sum(map(len, rounds.values())) * args.messages
                rounds[k].append(await mqtt_round(broker, nodes[:k], store, args.messages, first))
        for daemon, _ in nodes:
            await daemon.close()
        seqs = store.seqs(names)
    out: dict = {}
    for k, rs in rounds.items():
        out[f"{k}_nodes"] = {
            "msgs_per_s": spread([r["msgs_per_s"] for r in rs]),
            "msgs_per_node_cpu_s": spread([r["msgs_per_node_cpu_s"] for r in rs]),
            "server_cpu_us_per_message": spread([r["server_cpu_us_per_message"] for r in rs]),
            "rounds": rs,
        }
    one = rounds[1]
    for k in (2, 3):
        out[f"{k}_nodes_vs_1"] = spread(
            [r["msgs_per_s"] / o["msgs_per_s"] for r, o in zip(rounds[k], one, strict=True)]
        )
    total = args.messages * sum(map(len, rounds.values()))
    out["lost"] = len(set(range(total)) - set(seqs))
    out["duplicates"] = len(seqs) - len(set(seqs))
    out["messages"] = args.messages
    out["concurrency"] = args.concurrency
    out["store"] = (
        "postgresql, one database for all nodes"
        if args.store == "postgresql"
        else "sqlite, one file per node"
    )
    return out


# --- several nodes on one PostgreSQL store ----------------------------------------------------


def pg_store(cluster: Postgres, database: str, lease_s: float = 10.0) -> str:
    return (
        f'\n[store]\nurl = "{cluster.url(database)}"\n'
        f'password_file = "{cluster.password_file}"\nlease_s = {lease_s}\n'
    )


async def nodes_round(
    nodes: list[Daemon], read: Callable[..., list[tuple[Any, ...]]], cluster: Postgres, args
) -> dict:
    """Start `nodes`, load them together, wait for every final record, stop them."""
    await asyncio.gather(*(d.start(timeout_s=60) for d in nodes))
    try:
        before = await drained(read)
        cpu, server = [cpu_of(d.proc.pid) for d in nodes], server_cpu(cluster)
        headers = {"X-Amz-Invocation-Type": "Event"}
        share = max(1, args.connections // len(nodes))
        loads = await asyncio.gather(
            *(
                asyncio.to_thread(
                    loadgen,
                    f"{d.base}/2015-03-31/functions/noop/invocations",
                    share,
                    args.seconds,
                    "{}",
                    headers,
                )
                for d in nodes
            )
        )
        events = await drained(read) - before
        after, server_after = [cpu_of(d.proc.pid) for d in nodes], server_cpu(cluster)
    finally:
        await asyncio.gather(*(d.stop() for d in nodes))
    cpu_s = [
        sum(a[part] - b[part] for part in ("loop", "threads", "children"))
        for b, a in zip(cpu, after, strict=True)
    ]
    return {
        "nodes": len(nodes),
        "rps": round(sum(load["rps"] for load in loads), 1),
        "per_node_rps": [load["rps"] for load in loads],
        "errors": sum(load["errors"] for load in loads),
        "events": events,
        "node_cpu_s": [round(c, 3) for c in cpu_s],
        "events_per_node_cpu_s": round(events / sum(cpu_s), 1),
        "events_per_server_cpu_s": round(events / max(1e-9, server_after - server), 1),
        "machine": machine_share(cpu[0], after[0]),
    }


async def nodes_fleet(args: argparse.Namespace) -> dict:
    rounds: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    cluster = Postgres(durable=True)
    cluster.start()
    try:
        database = cluster.create_database()
        with tempfile.TemporaryDirectory() as tmp:
            nodes = []
            for i in range(3):
                folder = Path(tmp) / f"node{i + 1}"
                folder.mkdir()
                body = config(args.concurrency) + pg_store(cluster, database)
                daemon = f'max_workers = 8\nnode_id = "node{i + 1}"'
                nodes.append(Daemon(write_config(folder, body, daemon=daemon)))
            read = pg_reader(cluster, database)
            for n in range(args.rounds):
                order = [1, 2, 3][n % 3 :] + [1, 2, 3][: n % 3]
                for k in order:
                    rounds[k].append(await nodes_round(nodes[:k], read, cluster, args))
            for daemon in nodes:
                await daemon.close()
    finally:
        cluster.stop()
    out: dict = {}
    for k, rs in rounds.items():
        out[f"{k}_nodes"] = {
            "rps": spread([r["rps"] for r in rs]),
            "events_per_node_cpu_s": spread([r["events_per_node_cpu_s"] for r in rs]),
            "events_per_server_cpu_s": spread([r["events_per_server_cpu_s"] for r in rs]),
            "rounds": rs,
        }
    for k in (2, 3):
        out[f"{k}_nodes_vs_1"] = spread(
            [r["rps"] / o["rps"] for r, o in zip(rounds[k], rounds[1], strict=True)]
        )
    out["errors"] = sum(r["errors"] for rs in rounds.values() for r in rs)
    out["connections"] = args.connections
    out["concurrency"] = args.concurrency
    out["store"] = "postgresql, one database for all nodes (fsync on)"
    return out


SLOW = HERE.parent / "tests" / "functions" / "slow"


def slow_fn(concurrency: int) -> str:
    return (
        f'[functions.slow]\nhandler = "handler.handler"\ncode = "{SLOW}"\n'
        f"concurrency = {concurrency}\nmin_warm = {concurrency}\ntimeout_s = 10\n"
    )


async def takeover_round(a: Daemon, b: Daemon, read: Callable[..., list], held: int) -> dict:
    """Give a `held` events, kill it once the first runs: seconds until b runs one of them."""
    await a.start(timeout_s=60)
    mark = a.log_mark()
    ids = []
    for _ in range(held):
        status, headers, body = await a.invoke("slow", {"sleep_s": 0.2}, kind="Event")
        assert status == 202, body
        ids.append(headers["x-amzn-RequestId"])
    await a.wait_log("invocation_started", since=mark, invocation_id=ids[0])
    killed = time.time()
    await a.kill()
    async with asyncio.timeout(120):
        while True:  # the records are read from outside the daemons: polled, bounded
            rows = await asyncio.to_thread(
                read,
                "SELECT a.started_at, a.node FROM attempts a WHERE a.invocation_id = ANY(?)"
                " AND a.status = 'succeeded'",
                (ids,),
            )
            if len(rows) == held:
                break
            await asyncio.sleep(0.05)
    on_b = [started for started, node in rows if node == "b"]
    return {
        "takeover_s": round(min(on_b) - killed, 3),
        "taken_by_b": len(on_b),
        "held": held,
    }


async def takeover(args: argparse.Namespace) -> dict:
    cluster = Postgres(durable=True)
    cluster.start()
    rounds = []
    try:
        database = cluster.create_database()
        store = pg_store(cluster, database, args.lease_s)
        with tempfile.TemporaryDirectory() as tmp:
            daemons = {}
            for name, concurrency in (("a", 1), ("b", args.held)):
                folder = Path(tmp) / name
                folder.mkdir()
                body = slow_fn(concurrency) + store
                daemon = f'max_workers = {args.held + 1}\nnode_id = "{name}"'
                daemons[name] = Daemon(write_config(folder, body, daemon=daemon))
            await daemons["b"].start(timeout_s=60)
            read = pg_reader(cluster, database)
            try:
                for _ in range(args.rounds):
                    rounds.append(await takeover_round(daemons["a"], daemons["b"], read, args.held))
            finally:
                for daemon in daemons.values():
                    await daemon.close()
    finally:
        cluster.stop()
    times = [r["takeover_s"] for r in rounds]
    return {
        "takeover_s": spread(times),
        "lease_s": args.lease_s,
        "targets": {"takeover <= lease_s + 1 s": max(times) <= args.lease_s + 1},
        "rounds": rounds,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--part", choices=("store", "mqtt", "nodes", "takeover"), default="store")
    parser.add_argument("--messages", type=int, default=5000)  # per MQTT round
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")  # mqtt
    parser.add_argument("--lease-s", type=float, default=5.0)  # takeover
    parser.add_argument("--held", type=int, default=8)  # takeover: events node a holds
    args = parser.parse_args()
    if args.part == "mqtt":
        name = "fleet-mqtt" + ("-postgresql" if args.store == "postgresql" else "")
        report(name, await mqtt_fleet(args))
        return
    if args.part == "nodes":
        report("fleet-nodes", await nodes_fleet(args))
        return
    if args.part == "takeover":
        report("fleet-takeover", await takeover(args))
        return
    cluster = Postgres(durable=True)
    cluster.start()
    lite_rounds: list[dict] = []
    pg_rounds: list[dict] = []
    try:
        database = cluster.create_database()
        with tempfile.TemporaryDirectory() as lite_tmp, tempfile.TemporaryDirectory() as pg_tmp:
            body = config(args.concurrency)
            lite = Daemon(write_config(Path(lite_tmp), body, daemon="max_workers = 8"))
            store = (
                f'\n[store]\nurl = "{cluster.url(database)}"\n'
                f'password_file = "{cluster.password_file}"\n'
            )
            pg = Daemon(write_config(Path(pg_tmp), body + store, daemon="max_workers = 8"))
            await lite.start()
            await pg.start()
            read_lite = sqlite_reader(Path(lite_tmp) / "var" / "lambdaemon.db")
            read_pg = pg_reader(cluster, database)
            try:
                for daemon in (lite, pg):  # warm-up, not counted
                    url = f"{daemon.base}/2015-03-31/functions/noop/invocations"
                    headers = {"X-Amz-Invocation-Type": "Event"}
                    await asyncio.to_thread(loadgen, url, 4, 1, "{}", headers)
                for _ in range(args.rounds):
                    lite_rounds.append(await round_of(lite, read_lite, None, args))
                    pg_rounds.append(await round_of(pg, read_pg, cluster, args))
            finally:
                await lite.close()
                await pg.close()
    finally:
        cluster.stop()
    ratios = [p["rps"] / s["rps"] for p, s in zip(pg_rounds, lite_rounds, strict=True)]
    drains = [
        p["drain_per_s"] / s["drain_per_s"] for p, s in zip(pg_rounds, lite_rounds, strict=True)
    ]
    results = {
        "invoke_event_sqlite": summary(lite_rounds),
        "invoke_event_postgresql": summary(pg_rounds),
        "postgresql_vs_sqlite": spread(ratios),
        "drain_postgresql_vs_sqlite": spread(drains),
        "postgresql": {"version": cluster.bin.parts[-2], "fsync": True},
        "connections": args.connections,
        "concurrency": args.concurrency,
        "targets": {"postgresql >= 0.5x sqlite": statistics.median(ratios) >= 0.5},
    }
    report("fleet", results)


if __name__ == "__main__":
    asyncio.run(main())
