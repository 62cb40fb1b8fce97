"""Core benchmark: the Invoke API and the pool, next to a bare aiohttp baseline in the same run.

    .venv/bin/python benchmarks/core.py [--seconds 5] [--connections 32] [--rounds 3]

Measures, for a no-op Python handler:
- sync Invoke API throughput and p50/p99 latency at 32 concurrent connections, beside a bare
  aiohttp hello-world measured the same way in alternating rounds (benchmarks/common.py,
  paired_rounds) (target: >= 0.3x, p99 <= 10 ms);
- the same latency at as many connections as the function's concurrency (4), where no caller
  waits for a slot: the daemon's own latency under load, without the queue in front of it;
- sequential warm round-trip latency (one caller);
- cold start: first invoke of a function with no warm worker (target <= 150 ms);
- idle RSS of the daemon plus one warm worker (target <= 60 MB).
Writes benchmarks/results/core.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import bare_aiohttp, loadgen, paired_rounds, report  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402

NOOP = HERE / "functions" / "noop"
COLD_FUNCTIONS = 8
CONCURRENCY = 4


def functions_toml() -> str:
    body = f'[functions.noop]\nhandler = "handler.handler"\ncode = "{NOOP}"\nconcurrency = {CONCURRENCY}\nqueue_size = 1000\n'
    for i in range(COLD_FUNCTIONS):
        body += f'[functions.cold{i}]\nhandler = "handler.handler"\ncode = "{NOOP}"\n'
    return body


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(daemon: Daemon, connections: int, seconds: float, rounds: int) -> dict:
    results: dict = {}
    # cold starts: each cold<i> function has no worker yet
    colds = []
    for i in range(COLD_FUNCTIONS):
        started = time.perf_counter()
        status, _, _ = await daemon.invoke(f"cold{i}", {})
        colds.append((time.perf_counter() - started) * 1000)
        assert status == 200
    results["cold_start_ms"] = {
        "p50": round(statistics.median(colds), 1),
        "max": round(max(colds), 1),
    }

    # sequential warm round trips
    await daemon.invoke("noop", {})
    trips = []
    for _ in range(500):
        started = time.perf_counter()
        await daemon.invoke("noop", {})
        trips.append((time.perf_counter() - started) * 1000)
    trips.sort()
    results["warm_round_trip_ms"] = {
        "p50": round(statistics.median(trips), 3),
        "p99": round(trips[494], 3),
    }

    # idle RSS: the daemon and one warm worker of noop (fresh daemon state is not needed)
    _, _, body = await daemon.invoke("noop", {})
    worker_pid = json.loads(body)["pid"]
    results["idle_rss_mb"] = {
        "daemon": round(rss_mb(daemon.proc.pid), 1),
        "worker": round(rss_mb(worker_pid), 1),
    }
    results["idle_rss_mb"]["total"] = round(sum(results["idle_rss_mb"].values()), 1)

    url = f"{daemon.base}/2015-03-31/functions/noop/invocations"
    async with bare_aiohttp() as baseline:
        (
            results["invoke_api"],
            results["bare_aiohttp"],
            results["ratio_vs_bare"],
        ) = await paired_rounds(url, baseline, connections, seconds, rounds)
    unqueued = await asyncio.to_thread(loadgen, url, CONCURRENCY, seconds)
    results["invoke_api_4_connections"] = {k: unqueued[k] for k in ("rps", "p50_ms", "p99_ms")}
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), functions_toml(), daemon="max_workers = 12"))
        await daemon.start()
        try:
            results = await measure(daemon, args.connections, args.seconds, args.rounds)
        finally:
            await daemon.close()
    results["targets"] = {
        "ratio >= 0.3": results["ratio_vs_bare"] >= 0.3,
        "p99 <= 10 ms": results["invoke_api"]["p99_ms"] <= 10,
        "cold start <= 150 ms": results["cold_start_ms"]["p50"] <= 150,
        "idle RSS <= 60 MB": results["idle_rss_mb"]["total"] <= 60,
    }
    report("core", results)


if __name__ == "__main__":
    asyncio.run(main())
