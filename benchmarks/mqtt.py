"""MQTT benchmark: sustained QoS 1 messages/s through the daemon into completed invocations,
next to a bare aiomqtt subscriber measured on the same private broker in the same run.

    .venv/bin/python benchmarks/mqtt.py [--messages 5000]

A paho publisher sends N QoS 1 messages as fast as the broker acknowledges them; the rate is N
over the time from the first publish to the Nth message received (bare) or the Nth invocation
succeeded (daemon, counted in its SQLite file). Every message carries a sequence number, and the
daemon run checks that each one has exactly one record. Target: >= 0.3x bare, zero lost.
Writes benchmarks/results/mqtt.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import report  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402
from tests.mosquitto import Mosquitto  # noqa: E402

TOPIC = "bench/load"


def publish(port: int, count: int) -> float:
    """Publish `count` QoS 1 messages; return when the broker acknowledged all of them."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    infos = [client.publish(TOPIC, json.dumps({"seq": i}), qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()
    return started


async def bare_subscriber(port: int, count: int) -> dict:
    import aiomqtt

    received = 0
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-bare") as client:
        await client.subscribe(TOPIC, qos=1)
        publisher = asyncio.get_running_loop().run_in_executor(None, publish, port, count)
        async for _ in client.messages:
            received += 1
            if received == count:
                break
        finished = time.perf_counter()
        started = await publisher
    seconds = finished - started
    return {"messages": count, "seconds": round(seconds, 3), "msgs_per_s": round(count / seconds, 1)}


def succeeded(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT count(*) FROM invocations WHERE status = 'succeeded'").fetchone()[0]


async def through_daemon(broker: Mosquitto, count: int, tmp: Path) -> dict:
    body = (
        f'[mqtt]\nurl = "{broker.url}"\nclient_id = "bench-daemon"\n'
        f'[functions.noop]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
        f'concurrency = 4\nmin_warm = 4\n'
        f'[[functions.noop.triggers]]\ntype = "mqtt"\ntopic = "{TOPIC}"\nqos = 1\n'
    )
    daemon = Daemon(write_config(tmp, body, daemon="max_workers = 4"))
    await daemon.start()
    db = tmp / "var" / "lambdaemon.db"
    try:
        await daemon.wait_for(lambda: _subscribed(daemon))
        started = await asyncio.to_thread(publish, broker.port, count)
        async with asyncio.timeout(600):
            while await asyncio.to_thread(succeeded, db) < count:
                await asyncio.sleep(0.02)
        finished = time.perf_counter()
    finally:
        await daemon.close()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        seqs = [json.loads(e)["payload"]["seq"] for (e,) in conn.execute("SELECT event FROM invocations")]
    seconds = finished - started
    return {
        "messages": count, "seconds": round(seconds, 3), "msgs_per_s": round(count / seconds, 1),
        "records": len(seqs), "lost": len(set(range(count)) - set(seqs)), "duplicates": len(seqs) - len(set(seqs)),
    }


async def _subscribed(daemon: Daemon) -> bool:
    return any(e.get("event") == "mqtt_subscribed" for e in daemon.log_events())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker")
        broker.start()
        try:
            bare = await bare_subscriber(broker.port, args.messages)
            daemon = await through_daemon(broker, args.messages, Path(tmp))
        finally:
            broker.stop()
    results = {"bare_aiomqtt": bare, "daemon": daemon, "ratio_vs_bare": round(daemon["msgs_per_s"] / bare["msgs_per_s"], 3)}
    results["targets"] = {"ratio >= 0.3": results["ratio_vs_bare"] >= 0.3, "zero lost": daemon["lost"] == 0}
    report("mqtt", results)


if __name__ == "__main__":
    asyncio.run(main())
