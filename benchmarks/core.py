"""Core benchmark: the Invoke API and the pool, next to a bare aiohttp baseline in the same run.

    .venv/bin/python benchmarks/core.py [--seconds 5] [--connections 32]

Measures, for a no-op Python handler:
- sync Invoke API throughput and p50/p99 latency at 32 concurrent connections, beside a bare
  aiohttp hello-world measured the same way in the same run (target: >= 0.3x, p99 <= 10 ms);
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import report  # noqa: E402
from tests.daemon_proc import Daemon, free_port, write_config  # noqa: E402

NOOP = HERE / "functions" / "noop"
COLD_FUNCTIONS = 8


def functions_toml() -> str:
    body = f'[functions.noop]\nhandler = "handler.handler"\ncode = "{NOOP}"\nconcurrency = 4\nqueue_size = 1000\n'
    for i in range(COLD_FUNCTIONS):
        body += f'[functions.cold{i}]\nhandler = "handler.handler"\ncode = "{NOOP}"\n'
    return body


def loadgen(url: str, connections: int, seconds: float) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), url, "--connections", str(connections), "--seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


async def bare_baseline(connections: int, seconds: float) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "bare_aiohttp.py"), str(port)])
    try:
        await wait_port(port)
        return await asyncio.to_thread(loadgen, f"http://127.0.0.1:{port}/", connections, seconds)
    finally:
        server.terminate()
        server.wait()


async def wait_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(daemon: Daemon, connections: int, seconds: float) -> dict:
    results: dict = {}
    # cold starts: each cold<i> function has no worker yet
    colds = []
    for i in range(COLD_FUNCTIONS):
        started = time.perf_counter()
        status, _, _ = await daemon.invoke(f"cold{i}", {})
        colds.append((time.perf_counter() - started) * 1000)
        assert status == 200
    results["cold_start_ms"] = {"p50": round(statistics.median(colds), 1), "max": round(max(colds), 1)}

    # sequential warm round trips
    await daemon.invoke("noop", {})
    trips = []
    for _ in range(500):
        started = time.perf_counter()
        await daemon.invoke("noop", {})
        trips.append((time.perf_counter() - started) * 1000)
    trips.sort()
    results["warm_round_trip_ms"] = {"p50": round(statistics.median(trips), 3), "p99": round(trips[494], 3)}

    # idle RSS: the daemon and one warm worker of noop (fresh daemon state is not needed)
    _, _, body = await daemon.invoke("noop", {})
    worker_pid = json.loads(body)["pid"]
    results["idle_rss_mb"] = {
        "daemon": round(rss_mb(daemon.proc.pid), 1), "worker": round(rss_mb(worker_pid), 1),
    }
    results["idle_rss_mb"]["total"] = round(sum(results["idle_rss_mb"].values()), 1)

    url = f"{daemon.base}/2015-03-31/functions/noop/invocations"
    results["invoke_api"] = await asyncio.to_thread(loadgen, url, connections, seconds)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), functions_toml(), daemon="max_workers = 12"))
        await daemon.start()
        try:
            results = await measure(daemon, args.connections, args.seconds)
        finally:
            await daemon.close()
    results["bare_aiohttp"] = await bare_baseline(args.connections, args.seconds)
    results["ratio_vs_bare"] = round(results["invoke_api"]["rps"] / results["bare_aiohttp"]["rps"], 3)
    results["targets"] = {
        "ratio >= 0.3": results["ratio_vs_bare"] >= 0.3,
        "p99 <= 10 ms": results["invoke_api"]["p99_ms"] <= 10,
        "cold start <= 150 ms": results["cold_start_ms"]["p50"] <= 150,
        "idle RSS <= 60 MB": results["idle_rss_mb"]["total"] <= 60,
    }
    report("core", results)


if __name__ == "__main__":
    asyncio.run(main())
