"""Abuse benchmark: a normal client calls a sync webhook while the listener is attacked.

    .venv/bin/python benchmarks/abuse.py [--seconds 10] [--rounds 2] [--connections 8]
        [--attacks idle,slowloris,pipeliner,big_bodies] [--against daemon|bare]

Attacks (each during a whole load run of the normal client, on the webhook listener):
- idle: 10,000 connections that never send a byte, opened as fast as the daemon accepts them;
- slowloris: 100 clients that send a request head one byte a second, for ever;
- pipeliner: one client that pipelines requests without reading a single answer;
- big_bodies: 40 clients that send 6 MB bodies to a route that does not exist, again and again.

Rounds alternate quiet (the normal client alone) and attacked. The attacker is a process of
its own at nice 19 (on a real network it is another machine). For each attack: the normal
client's throughput and p99 against the quiet round before it, the daemon's peak RSS while
attacked, and how long each attacking connection stayed open against its timeout, as the
attacker saw it (from connect, or for the pipeliner from the daemon's last read of it, to the
end; the config sets head_timeout_s = 5, body_timeout_s = 10 so that a round sees them expire).
Targets: throughput and p99 within 2x of quiet, RSS under 150 MB, every connection closed within
its timeout + 2 s. Writes benchmarks/results/abuse.json. `--against bare` runs the same attacks
on bare aiohttp (benchmarks/bare_aiohttp.py, any POST answered), the baseline that shows what
this machine allows a server here (benchmarks/results/abuse-bare.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import loadgen, report, wait_port  # noqa: E402
from tests.daemon_proc import Daemon, free_port, write_config  # noqa: E402

HEAD_TIMEOUT_S = 5.0
BODY_TIMEOUT_S = 10.0
SLACK_S = 2.0  # "closed within its timeout": the deadline sweep runs once a second, and more


class Attack:
    """Connections of one attack: how long each stayed open, and which the daemon ended."""

    def __init__(self, port: int, timeout_s: float) -> None:
        self.port, self.timeout_s = port, timeout_s
        self.lifetimes: list[float] = []  # connect → closed by the daemon
        self.open_at_end = 0  # still open when the round ended, younger than the timeout
        self.overdue = 0  # still open when the round ended, older than timeout + slack
        self.refused = 0  # connect() failed
        self._running = True

    def stop(self) -> None:
        self._running = False

    async def _until_closed(
        self, reader: asyncio.StreamReader, began: float, talk: Awaitable[None] | None = None
    ) -> None:
        """Read (and drop) until the daemon closes; count the connection's fate."""
        talker = asyncio.ensure_future(talk) if talk is not None else None
        try:
            while self._running:
                try:
                    async with asyncio.timeout(0.5):
                        if not await reader.read(65536):
                            self.lifetimes.append(time.monotonic() - began)
                            return
                except TimeoutError:
                    continue
                except ConnectionError:
                    self.lifetimes.append(time.monotonic() - began)
                    return
            age = time.monotonic() - began
            if age > self.timeout_s + SLACK_S:
                self.overdue += 1
            else:
                self.open_at_end += 1
        finally:
            if talker is not None:
                talker.cancel()
                with contextlib.suppress(BaseException):
                    await talker

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.refused += 1
            return None

    def figures(self) -> dict:
        lifetimes = sorted(self.lifetimes)
        return {
            "connections_closed": len(lifetimes),
            "lifetime_s": {
                "p50": round(statistics.median(lifetimes), 2) if lifetimes else None,
                "max": round(lifetimes[-1], 2) if lifetimes else None,
            },
            "timeout_s": self.timeout_s,
            "open_at_end_within_timeout": self.open_at_end,
            "open_past_timeout": self.overdue
            + sum(1 for t in lifetimes if t > self.timeout_s + SLACK_S),
            "connect_failed": self.refused,
        }


async def idle(attack: Attack) -> None:
    """10,000 connections that say nothing; each is re-opened once the daemon closes it."""
    sem = asyncio.Semaphore(10_000)

    async def one() -> None:
        async with sem:
            conn = await attack.connect()
            if conn is None:
                return
            reader, writer = conn
            await attack._until_closed(reader, time.monotonic())
            writer.close()

    tasks: set[asyncio.Task[None]] = set()
    while attack._running:
        while len(tasks) < 10_000 and attack._running:
            tasks.add(asyncio.ensure_future(one()))
            if len(tasks) % 200 == 0:
                await asyncio.sleep(0)  # let the connects progress
        done, tasks = await asyncio.wait(tasks, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*tasks, return_exceptions=True)


async def slowloris(attack: Attack, clients: int = 100) -> None:
    head = b"POST /hooks/noop HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 10_000

    async def drip(writer: asyncio.StreamWriter) -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(1)  # the attack's own pace: one byte a second

    async def one() -> None:
        while attack._running:
            conn = await attack.connect()
            if conn is None:
                await asyncio.sleep(0.1)  # the listener refused: try again shortly
                continue
            reader, writer = conn

            await attack._until_closed(reader, time.monotonic(), drip(writer))
            writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))


async def pipeliner(attack: Attack) -> None:
    """Pipelines requests (to a path with no route, so that no function is shared with the
    normal client) and never reads an answer. Its figure is the time from the daemon's last
    read of the connection (the client's last progress) to the connection's end."""
    request = b"POST /pipelined HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}" * 64

    while attack._running:
        conn = await attack.connect()
        if conn is None:
            await asyncio.sleep(0.1)  # the listener refused: try again shortly
            continue
        _reader, writer = conn
        writer.transport.set_write_buffer_limits(high=1 << 20)
        progress = time.monotonic()
        try:
            while attack._running:  # never reads an answer
                writer.write(request)
                async with asyncio.timeout(0.5):
                    await writer.drain()  # blocks once the daemon stops reading
                progress = time.monotonic()
        except TimeoutError:  # stalled: wait for the daemon to end it
            try:
                async with asyncio.timeout(attack.timeout_s + 2 * SLACK_S):
                    while True:
                        writer.write(request)
                        await writer.drain()
            except ConnectionError:
                attack.lifetimes.append(time.monotonic() - progress)
            except TimeoutError:
                attack.overdue += 1
        except ConnectionError:
            attack.lifetimes.append(time.monotonic() - progress)
        else:
            attack.open_at_end += 1
        writer.close()


async def big_bodies(attack: Attack, clients: int = 40) -> None:
    size = 6 * 1024 * 1024
    head = f"POST /not-a-route HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode()
    chunk = b"x" * 65536

    async def send(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()

    async def one() -> None:
        while attack._running:
            conn = await attack.connect()
            if conn is None:
                await asyncio.sleep(0.1)
                continue
            reader, writer = conn
            began = time.monotonic()

            await attack._until_closed(reader, began, send(writer))
            writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))


ATTACKS: dict[str, tuple[Callable[[Attack], Awaitable[None]], float]] = {
    "idle": (idle, HEAD_TIMEOUT_S),
    "slowloris": (slowloris, HEAD_TIMEOUT_S),
    "pipeliner": (pipeliner, BODY_TIMEOUT_S),
    "big_bodies": (big_bodies, HEAD_TIMEOUT_S),
}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def attacked_run(
    pid: int, port: int, name: str, url: str, connections: int, seconds: float
) -> tuple[dict, dict, float]:
    """One load run of the normal client while `name` attacks from a process of its own.

    The attacker runs at the lowest CPU priority (nice 19): on a real network it is another
    machine, and here it must not win the daemon's two cores by its own CPU use. What it
    managed to send is in its figures.
    """
    _, timeout_s = ATTACKS[name]
    last = seconds + 1.0 + timeout_s + SLACK_S
    attacker = await asyncio.create_subprocess_exec(
        "nice", "-n", "19", sys.executable, __file__, "--attacker", name,
        "--port", str(port), "--seconds", str(last),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    peak = 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.2)  # sampling period

    sampler = asyncio.ensure_future(sample())
    await asyncio.sleep(1.0)  # let the attack build up before measuring
    load = await asyncio.to_thread(loadgen, url, connections, seconds)
    out, _ = await asyncio.wait_for(attacker.communicate(), last + 60)
    sampler.cancel()
    return load, json.loads(out), round(peak, 1)


async def attack_for(name: str, port: int, seconds: float) -> dict:
    """The attacker process: attack for `seconds` (then let every connection meet its fate)."""
    run, timeout_s = ATTACKS[name]
    attack = Attack(port, timeout_s)
    task = asyncio.ensure_future(run(attack))
    started = time.monotonic()
    await asyncio.sleep(seconds)  # the attack's duration
    attack.stop()
    await asyncio.wait_for(task, 60)
    figures = attack.figures()
    figures["connections_per_s"] = round(
        (len(attack.lifetimes) + attack.open_at_end + attack.overdue)
        / (time.monotonic() - started),
        1,
    )
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument(
        "--against",
        choices=["daemon", "bare"],
        default="daemon",
        help="bare: the same attacks on bare aiohttp, the baseline (results/abuse-bare.json)",
    )
    parser.add_argument("--attacker", choices=list(ATTACKS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:  # the attacking process (see attacked_run)
        _raise_nofile()
        print(json.dumps(await attack_for(args.attacker, args.port, args.seconds)))
        return
    nofile = _raise_nofile()
    port = free_port()
    results: dict = {"config": {"head_timeout_s": HEAD_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S}}
    async with serving(args.against, port, nofile) as (pid, health):
        url = f"http://127.0.0.1:{port}/hooks/noop"
        await asyncio.to_thread(loadgen, url, 4, 1)  # warm the workers
        results["idle_rss_mb"] = round(rss_mb(pid), 1)
        for name in args.attacks.split(","):
            quiet, attacked, closes, peaks = [], [], [], []
            for _ in range(args.rounds):
                quiet.append(await asyncio.to_thread(loadgen, url, args.connections, args.seconds))
                load, fate, peak = await attacked_run(
                    pid, port, name, url, args.connections, args.seconds
                )
                attacked.append(load)
                closes.append(fate)
                peaks.append(peak)
            results[name] = summarise(quiet, attacked, closes, peaks)
            print(name, results[name], flush=True)
        results["health_http"] = await health()
    report("abuse" if args.against == "daemon" else "abuse-bare", results)


@contextlib.asynccontextmanager
async def serving(
    against: str, port: int, nofile: int
) -> AsyncIterator[tuple[int, Callable[[], Awaitable[Any]]]]:
    """The server under attack: the daemon with a sync webhook on `port`, or (the baseline)
    bare aiohttp answering any POST there. Yields its pid and how to read its /health."""
    if against == "bare":
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "bare_aiohttp.py"),
            str(port),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        try:
            await wait_port(port)

            async def no_health() -> None:
                return None

            yield server.pid, no_health
        finally:
            server.terminate()
            await server.wait()
        return
    body = (
        f'[webhooks]\nlisten = "127.0.0.1:{port}"\n'
        f"head_timeout_s = {HEAD_TIMEOUT_S}\nbody_timeout_s = {BODY_TIMEOUT_S}\n"
        f'[functions.noop]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
        "concurrency = 4\nqueue_size = 1000\n"
        '[[functions.noop.triggers]]\ntype = "webhook"\npath = "/hooks/noop"\nmode = "sync"\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), body), nofile=nofile)
        await daemon.start()
        try:
            assert daemon.proc is not None

            async def health() -> Any:
                return (await daemon.get("/health")).get("http")

            yield daemon.proc.pid, health
        finally:
            await daemon.close()


def _raise_nofile() -> int:
    """The idle attack holds 10,000 descriptors; the daemon up to max_connections."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    return nofile


def summarise(
    quiet: list[dict], attacked: list[dict], closes: list[dict], peaks: list[float]
) -> dict:
    rps = [a["rps"] / q["rps"] for q, a in zip(quiet, attacked, strict=True)]
    p99 = [a["p99_ms"] / max(q["p99_ms"], 0.01) for q, a in zip(quiet, attacked, strict=True)]
    worst = max(closes, key=lambda c: c["open_past_timeout"])
    out = {
        "quiet": [{k: q[k] for k in ("rps", "p99_ms", "errors")} for q in quiet],
        "attacked": [{k: a[k] for k in ("rps", "p99_ms", "errors")} for a in attacked],
        "throughput_ratio": [round(r, 3) for r in rps],
        "p99_ratio": [round(r, 2) for r in p99],
        "peak_rss_mb": peaks,
        "connections": closes,
    }
    out["targets"] = {
        "throughput within 2x": min(rps) >= 0.5,
        "p99 within 2x": max(p99) <= 2.0,
        "rss < 150 MB": max(peaks) < 150,
        "closed within timeout + 2 s": worst["open_past_timeout"] == 0,
    }
    return out


if __name__ == "__main__":
    asyncio.run(main())
