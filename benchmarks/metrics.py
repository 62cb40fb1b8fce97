"""GET /metrics: what scraping costs the Invoke path, how fast a scrape answers, and its memory.

    .venv/bin/python benchmarks/metrics.py [--seconds 5] [--connections 32] [--rounds 6]

Measures:
- core.py's load (sync Invoke of a no-op handler, 32 connections) with /metrics scraped once a
  second against the same load without scraping, in one daemon, rounds alternating (the order
  flips each pair, so a drift of the VM's speed does not favour one side); the ratio is the
  median of the per-pair throughput ratios, with its spread (target: >= 0.95);
- /metrics of a daemon with 50 functions, each invoked (sync and async) so that every series
  exists: round-trip time of 200 scrapes one after another (target: p99 < 20 ms), the daemon's
  CPU time per scrape (/proc), the body's size and its number of samples;
- the daemon's RSS idle before the first scrape (prometheus-client not imported yet), after it,
  and after the 200 scrapes;
- with `--base COMMIT`: the idle RSS of core.py's daemon (one warm worker, never scraped) in a
  worktree of that commit and in this tree, alternating, three times each.
Writes benchmarks/results/metrics.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import loadgen, report, spread_ms  # noqa: E402
from benchmarks.core import NOOP, functions_toml, rss_mb  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402

FUNCTIONS = 50
SCRAPES = 200
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def scrape(session: aiohttp.ClientSession, base: str) -> bytes:
    async with session.get(f"{base}/metrics") as resp:
        assert resp.status == 200, resp.status
        return await resp.read()


async def scraping_throughput(
    daemon: Daemon, connections: int, seconds: float, rounds: int
) -> dict:
    url = f"{daemon.base}/2015-03-31/functions/noop/invocations"
    assert daemon.proc is not None
    pid = daemon.proc.pid
    await asyncio.to_thread(loadgen, url, connections, 1.0)  # warm the workers up
    plain: list[dict] = []
    scraped: list[dict] = []
    scrapes: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def scrape_each_second() -> None:
            while True:
                started = time.perf_counter()
                await scrape(session, daemon.base)
                scrapes.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(1.0)  # the scrape interval itself

        async def one(with_scrapes: bool) -> dict:
            scraper = asyncio.ensure_future(scrape_each_second()) if with_scrapes else None
            cpu = cpu_s(pid)
            try:
                result = await asyncio.to_thread(loadgen, url, connections, seconds)
            finally:
                if scraper is not None:
                    scraper.cancel()
            # The daemon's CPU per call, its scrapes included: steadier than req/s on this VM.
            result["cpu_us"] = (cpu_s(pid) - cpu) * 1e6 / max(1, result["requests"])
            return result

        for pair in range(rounds):
            order = (False, True) if pair % 2 == 0 else (True, False)
            for with_scrapes in order:
                (scraped if with_scrapes else plain).append(await one(with_scrapes))
    ratios = [s["rps"] / p["rps"] for s, p in zip(scraped, plain, strict=True)]
    cpu_ratios = [s["cpu_us"] / p["cpu_us"] for s, p in zip(scraped, plain, strict=True)]
    return {
        "without_scraping_rps": [round(r["rps"]) for r in plain],
        "scraped_each_second_rps": [round(r["rps"]) for r in scraped],
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "daemon_cpu_us_per_call_without": [round(r["cpu_us"], 1) for r in plain],
        "daemon_cpu_us_per_call_scraped": [round(r["cpu_us"], 1) for r in scraped],
        "cpu_ratio": round(statistics.median(cpu_ratios), 3),
        "cpu_ratio_min": round(min(cpu_ratios), 3),
        "cpu_ratio_max": round(max(cpu_ratios), 3),
        "p99_ms_without": round(statistics.median(r["p99_ms"] for r in plain), 2),
        "p99_ms_scraped": round(statistics.median(r["p99_ms"] for r in scraped), 2),
        "scrapes": len(scrapes),
        "scrape_under_load_ms": spread_ms(scrapes) if scrapes else None,
        "errors": sum(r["errors"] for r in plain + scraped),
    }


def many_functions_toml() -> str:
    return "".join(
        f'[functions.fn{i:02d}]\nhandler = "handler.handler"\ncode = "{NOOP}"\n'
        for i in range(FUNCTIONS)
    )


async def fifty_functions() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), many_functions_toml(), daemon="max_workers = 4")
        daemon = Daemon(config)
        await daemon.start()
        try:
            return await _measure_scrapes(daemon)
        finally:
            await daemon.close()


async def _measure_scrapes(daemon: Daemon) -> dict:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    for i in range(FUNCTIONS):
        for kind in ("RequestResponse", "RequestResponse", "Event"):
            status, _, _ = await daemon.invoke(f"fn{i:02d}", {}, kind=kind)
            assert status in (200, 202), status
    await daemon.barrier()
    await asyncio.sleep(2.0)  # let the async calls finish and the daemon settle before idle RSS
    results: dict = {"idle_rss_mb_before_first_scrape": round(rss_mb(pid), 1)}
    async with aiohttp.ClientSession() as session:
        body = await scrape(session, daemon.base)
        results["idle_rss_mb_after_first_scrape"] = round(rss_mb(pid), 1)
        times = []
        cpu = cpu_s(pid)
        for _ in range(SCRAPES):
            started = time.perf_counter()
            body = await scrape(session, daemon.base)
            times.append((time.perf_counter() - started) * 1000)
        cpu_ms = (cpu_s(pid) - cpu) * 1000 / SCRAPES
    results["idle_rss_mb_after_scrapes"] = round(rss_mb(pid), 1)
    text = body.decode()
    results.update(
        {
            "scrape_round_trip_ms": spread_ms(times),
            "daemon_cpu_ms_per_scrape": round(cpu_ms, 2),
            "body_bytes": len(body),
            "samples": sum(1 for line in text.splitlines() if line and line[0] != "#"),
        }
    )
    return results


IDLE_RSS = """
import asyncio, json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.core import functions_toml, rss_mb
from tests.daemon_proc import Daemon, write_config

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), functions_toml(), daemon="max_workers = 12"))
        await daemon.start()
        try:
            status, _, body = await daemon.invoke("noop", {})
            await asyncio.sleep(2.0)  # idle: what the call allocated is settled
            print(json.dumps([rss_mb(daemon.proc.pid), rss_mb(json.loads(body)["pid"])]))
        finally:
            await daemon.close()

asyncio.run(main())
"""


def idle_rss_against(base: str) -> dict:
    """core.py's idle daemon (never scraped) at `base` and in this tree, alternating."""
    root = HERE.parent
    figures: dict[str, list[float]] = {base: [], "this tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), base], cwd=root, check=True
        )
        try:
            for _ in range(3):
                for name, where in ((base, tree), ("this tree", root)):
                    out = subprocess.run(
                        [sys.executable, "-c", IDLE_RSS], cwd=where, check=True, capture_output=True
                    )
                    figures[name].append(json.loads(out.stdout)[0])
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=root, check=True
            )
    return {name: [round(mb, 1) for mb in values] for name, values in figures.items()}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--base", help="a commit to compare the idle daemon's RSS with")
    args = parser.parse_args()
    results: dict = {"functions_50": await fifty_functions()}
    if args.base:
        results["idle_daemon_rss_mb"] = idle_rss_against(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), functions_toml(), daemon="max_workers = 12"))
        await daemon.start()
        try:
            results["core_load"] = await scraping_throughput(
                daemon, args.connections, args.seconds, args.rounds
            )
        finally:
            await daemon.close()
    scrapes = results["functions_50"]["scrape_round_trip_ms"]
    results["targets"] = {
        "scraped throughput >= 0.95x": results["core_load"]["ratio"] >= 0.95,
        "/metrics with 50 functions p99 < 20 ms": scrapes["p99"] < 20,
    }
    report("metrics", results)


if __name__ == "__main__":
    asyncio.run(main())
