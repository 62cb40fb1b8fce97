"""The chaos scenario: load from all four sources while the daemon is SIGKILLed, then an audit.

    report = await run_chaos(Chaos(workdir, seconds=24, kills=3, seed=7))
    assert report.ok, report.summary()

The real daemon runs as a subprocess beside a private Mosquitto, with four functions on one
no-op handler (tests/functions/chaos_noop), one trigger each. Producers run all through:
- MQTT: QoS 1 publishes of {"seq": n}; n counts as accepted once its PUBACK arrives. The broker
  stays up and queues for the daemon's persistent session while the daemon is down. Every other
  message carries the `message-id` user property, so both of the MQTT source's dedupe rules
  (publisher id, and the DUP/packet-id rule) are under fire.
- webhook (async route): POSTs of {"id": n}; n counts once its 202 arrives, with the invocation
  id the 202 named. A post the dying or absent daemon does not answer is not counted.
- files: {n}.json written beside the inbox and renamed into it; counts once it left the inbox.
- cron `* * * * * *`, run_all: every nominal second after the marker of the first start up to
  the marker left at the end counts (the marker is committed with the fire).
Producers send in bursts, so work is in flight at many instants. Meanwhile the daemon is
SIGKILLed `kills` times at seeded random moments (a kill may land while it is still starting)
and restarted after a random downtime.
Then the producers stop, the daemon settles and stops cleanly, and tests/chaos_audit.py checks
the SQLite file and the handler's own run log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.chaos_audit import Accepted, Report, Run, audit, cron_marker, query
from tests.daemon_proc import ROOT, Daemon, free_port, shared_folder, write_config
from tests.mosquitto import Mosquitto

__all__ = ["Chaos", "Report", "run_chaos"]

HANDLER = ROOT / "tests" / "functions" / "chaos_noop"
TOPIC = "chaos/events"


@dataclass(frozen=True)
class Chaos:
    """One run's settings; rates are events per second."""

    workdir: Path
    seconds: float = 24.0
    kills: int = 3
    seed: int = 7
    # About half of what this daemon sustains on a 2-core box beside the load generator, so a
    # kill's backlog drains between kills and settling stays short; in bursts, so that work is
    # in flight (received, committing, acking, running) at many of the instants a kill can hit.
    mqtt_rate: float = 100.0
    webhook_rate: float = 40.0
    files_rate: float = 12.0
    bursts: tuple[int, int, int] = (40, 10, 4)  # mqtt, webhook, files
    max_downtime_s: float = 1.5
    settle_timeout_s: float = 30.0
    # The mqtt and files triggers' batch_size and batch_window_s (daemon/batches.py); 1: none.
    batch_size: int = 1
    batch_window_s: float = 0.0


def config_body(chaos: Chaos, broker: Mosquitto, webhook_port: int) -> str:
    runs = shared_folder(chaos.workdir) / "runs.log"  # the handlers write it (write_config)
    common = (
        f'handler = "handler.handler"\ncode = "{HANDLER}"\nretries = 10\n'
        f'retry_backoff_s = [0.2, 1.0]\nenv = {{ CHAOS_RUNS_FILE = "{runs}" }}\n'
    )
    batch = ""
    if chaos.batch_size > 1:
        batch = f"\nbatch_size = {chaos.batch_size}\nbatch_window_s = {chaos.batch_window_s}"
    triggers = {
        "mqtt": f'type = "mqtt"\ntopic = "{TOPIC}"\nqos = 1{batch}',
        "webhook": 'type = "webhook"\npath = "/hooks/chaos"\nmode = "async"',
        "files": f'type = "files"\npath = "{chaos.workdir / "inbox"}"\npattern = "*.json"{batch}',
        "cron": 'type = "cron"\nschedule = "* * * * * *"\nmissed = "run_all"\ngrace_s = 3600',
    }
    body = (
        f'[mqtt]\nurl = "{broker.url}"\nclient_id = "lambdaemon-chaos"\n\n'
        f'[webhooks]\nlisten = "127.0.0.1:{webhook_port}"\n\n'
    )
    for source, trigger in triggers.items():
        concurrency = {"mqtt": 3, "webhook": 2}.get(source, 1)
        body += f"[functions.chaos_{source}]\n{common}concurrency = {concurrency}\n"
        body += f"[[functions.chaos_{source}.triggers]]\n{trigger}\n\n"
    return body


async def run_chaos(chaos: Chaos) -> Report:
    """Run the scenario in `chaos.workdir` (created) and audit it."""
    wall = time.monotonic()
    workdir = chaos.workdir
    (workdir / "inbox").mkdir(parents=True, exist_ok=True)
    (workdir / "staging").mkdir(exist_ok=True)
    broker = Mosquitto(workdir / "broker")
    broker.start()
    webhook_port = free_port()
    daemon = Daemon(
        write_config(workdir, config_body(chaos, broker, webhook_port), daemon="max_workers = 7")
    )
    try:
        await daemon.start()
        await daemon.wait_logged(lambda: _ready_for_load(daemon), timeout_s=20)
        first_marker = cron_marker(daemon)
        accepted = Accepted()
        stop = asyncio.Event()
        async with _producers(chaos, broker, webhook_port, accepted, stop):
            kills = await _kill_repeatedly(chaos, daemon)
            stop.set()
        settled = await _settle(chaos, daemon, accepted)
        run = Run(
            workdir,
            chaos.seconds,
            accepted,
            first_marker,
            cron_marker(daemon),
            datetime.now(UTC),
            kills,
            settled,
        )
        await daemon.stop()
        report = audit(daemon, run)
        report.wall_s = round(time.monotonic() - wall, 1)
        return report
    finally:
        await daemon.close()
        broker.close()


# --- producers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _producers(
    chaos: Chaos, broker: Mosquitto, webhook_port: int, accepted: Accepted, stop: asyncio.Event
) -> AsyncIterator[None]:
    """Run the three producers until `stop` is set; on exit each has finished its last event."""
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(_publish_mqtt(chaos, broker.port, accepted, stop))
        tasks.create_task(_post_webhooks(chaos, webhook_port, accepted, stop))
        tasks.create_task(_drop_files(chaos, accepted, stop))
        yield


async def _paced(rate: float, stop: asyncio.Event, burst: int = 1) -> AsyncIterator[int]:
    """1, 2, 3, ... at `rate` per second in bursts until `stop`: a load rate, not a wait."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    numbers = itertools.count(1)
    while not stop.is_set():
        for n in itertools.islice(numbers, burst):
            yield n
        due += burst / rate
        await asyncio.sleep(max(0.0, due - loop.time()))


async def _publish_mqtt(chaos: Chaos, port: int, accepted: Accepted, stop: asyncio.Event) -> None:
    v5 = aiomqtt.ProtocolVersion.V5
    client = aiomqtt.Client(
        "127.0.0.1", port, identifier="chaos-publisher", protocol=v5, max_inflight_messages=100
    )
    client.pending_calls_threshold = 10_000  # many publishes in flight is the point: no warning
    async with client:

        async def publish(seq: int) -> None:
            props = None
            if seq % 2 == 0:  # the publisher-id dedupe rule; odd ones rely on DUP and packet ids
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = ("message-id", f"chaos-{seq}")
            payload = json.dumps({"seq": seq})
            await client.publish(TOPIC, payload, qos=1, properties=props, timeout=30)
            accepted.mqtt.append(seq)  # the broker's PUBACK is in

        async with asyncio.TaskGroup() as publishes:
            async for seq in _paced(chaos.mqtt_rate, stop, chaos.bursts[0]):
                publishes.create_task(publish(seq))


async def _post_webhooks(chaos: Chaos, port: int, accepted: Accepted, stop: asyncio.Event) -> None:
    url = f"http://127.0.0.1:{port}/hooks/chaos"
    # A new connection per post, as most webhook senders do: no keep-alive to a killed daemon.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post(n: int) -> None:
            try:
                async with session.post(url, json={"id": n}) as resp:
                    body = await resp.json() if resp.status == 202 else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                body = None  # refused, reset by the kill, or cut off mid-answer: not accepted
            if body is None:
                accepted.webhook_failed += 1
            else:
                accepted.webhook[n] = body["invocation_id"]

        async with asyncio.TaskGroup() as posts:
            async for n in _paced(chaos.webhook_rate, stop, chaos.bursts[1]):
                posts.create_task(post(n))


async def _drop_files(chaos: Chaos, accepted: Accepted, stop: asyncio.Event) -> None:
    async for n in _paced(chaos.files_rate, stop, chaos.bursts[2]):
        name = f"{n:06d}.json"
        await asyncio.to_thread(_drop, chaos.workdir, name, json.dumps({"n": n}).encode())
        accepted.files.append(name)


def _drop(workdir: Path, name: str, data: bytes) -> None:
    # Written beside the inbox on the same filesystem and renamed in: complete when it appears.
    staged = workdir / "staging" / name
    staged.write_bytes(data)
    os.rename(staged, workdir / "inbox" / name)


# --- kills -------------------------------------------------------------------------------------


async def _kill_repeatedly(chaos: Chaos, daemon: Daemon) -> list[dict[str, Any]]:
    """SIGKILL `kills` times at seeded random moments of the run; restart after each.

    The moments are a Poisson process over the run (exponential gaps, scaled to fit), so some
    kills come seconds apart and some land while the daemon is still starting or catching up.
    """
    rng = random.Random(chaos.seed)
    downtimes = [rng.uniform(0.0, chaos.max_downtime_s) for _ in range(chaos.kills)]
    gaps = [rng.expovariate(1.0) for _ in range(chaos.kills + 1)]
    scale = max(chaos.seconds - sum(downtimes), 1.0) / sum(gaps)
    loop = asyncio.get_running_loop()
    began, kills = loop.time(), []
    up_since, starting = began, None
    for gap, downtime_s in zip(gaps, downtimes, strict=False):
        await asyncio.sleep(max(0.0, up_since + gap * scale - loop.time()))  # the kill schedule
        during_start = starting is not None and not starting.done()
        if starting is not None:
            if during_start:
                starting.cancel()  # stops the health polling; the process is killed next
            await asyncio.wait({starting})
            if not starting.cancelled():
                starting.result()  # a start that failed on its own is the scenario's failure
        await daemon.kill()
        kills.append(
            {
                "at_s": round(loop.time() - began, 2),
                "during_start": during_start,
                "uptime_s": round(loop.time() - up_since, 2),
                "downtime_s": round(downtime_s, 2),
            }
        )
        await asyncio.sleep(downtime_s)  # part of the schedule: the sources pile up meanwhile
        up_since = loop.time()
        # Not awaited: the next kill may land while this start is still recovering.
        starting = asyncio.create_task(daemon.start(timeout_s=30))
    await asyncio.sleep(max(0.0, began + chaos.seconds - loop.time()))  # the load runs on
    if starting is not None:
        await starting
    return kills


# --- readiness and settling --------------------------------------------------------------------


def _ready_for_load(daemon: Daemon) -> bool:
    # The persistent session must exist before the first publish, or the broker drops it.
    # The cron marker is committed before cron_started is logged.
    logged = {e.get("event") for e in daemon.log_events()}
    needed = {"mqtt_subscribed", "webhook_listening", "files_rescanned", "cron_started"}
    return needed <= logged and cron_marker(daemon) is not None


async def _settle(chaos: Chaos, daemon: Daemon, accepted: Accepted) -> float | None:
    """Wait (bounded) until every accepted event is recorded and nothing is left to run.

    Returns the seconds it took, or None on timeout: the audit then says what is missing.
    """
    began = time.monotonic()
    inbox = chaos.workdir / "inbox"

    async def settled() -> bool:
        counts = dict(query(daemon, "SELECT function, COUNT(*) FROM invocations GROUP BY function"))
        waiting = query(
            daemon, "SELECT COUNT(*) FROM invocations WHERE status IN ('queued', 'running')"
        )[0][0]
        return (
            waiting == 0
            and counts.get("chaos_mqtt", 0) >= len(accepted.mqtt)
            and counts.get("chaos_webhook", 0) >= len(accepted.webhook)
            and counts.get("chaos_files", 0) >= len(accepted.files)
            and not any(inbox.glob("*.json"))
            and not any((inbox / ".processing").iterdir())
        )

    try:
        # Polled: settling is the state of every source at once, and the last change (a final
        # record's write) comes after its line; re-checking on every line would add a store
        # barrier per line under load.
        await daemon.wait_for(settled, timeout_s=chaos.settle_timeout_s, interval_s=0.2)
    except AssertionError:  # until()'s word for "timed out": not settled
        return None
    return round(time.monotonic() - began, 2)
