"""Webhook benchmark: a sync no-op route at 32 connections, beside bare aiohttp in the same run.

    .venv/bin/python benchmarks/webhook.py [--seconds 5] [--connections 32] [--rounds 3]

Rounds alternate with bare aiohttp (benchmarks/common.py, paired_rounds). Target: throughput
>= 0.3x bare aiohttp, p99 <= 10 ms; the p99 at 4 connections (the route's concurrency, so no
caller waits for a slot) is reported beside it. The same function is then loaded through a
greedy route (`/api/{proxy+}`, found after an exact miss and a longer greedy prefix that does
not match), paired with bare aiohttp the same way: its ratio should be within noise of the exact
route's. Writes benchmarks/results/webhook.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import bare_aiohttp, loadgen, paired_rounds, report  # noqa: E402
from tests.daemon_proc import Daemon, free_port, write_config  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    body = (
        f'[webhooks]\nlisten = "127.0.0.1:{port}"\n'
        f'[functions.noop]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
        "concurrency = 4\nqueue_size = 1000\n"
        '[[functions.noop.triggers]]\ntype = "webhook"\npath = "/hooks/noop"\nmode = "sync"\n'
        '[[functions.noop.triggers]]\ntype = "webhook"\npath = "/api/{proxy+}"\n'
        '[[functions.noop.triggers]]\ntype = "webhook"\npath = "/api/admin/*"\n'
        '[[functions.noop.triggers]]\ntype = "webhook"\npath = "/static/*"\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), body))
        await daemon.start()
        try:
            url = f"http://127.0.0.1:{port}/hooks/noop"
            await asyncio.to_thread(loadgen, url, 4, 1)  # warm the workers
            async with bare_aiohttp() as baseline:
                webhook, bare, ratio = await paired_rounds(
                    url, baseline, args.connections, args.seconds, args.rounds
                )
            unqueued = await asyncio.to_thread(loadgen, url, 4, args.seconds)
            greedy_url = f"http://127.0.0.1:{port}/api/items/42"
            async with bare_aiohttp() as baseline:
                greedy, greedy_bare, greedy_ratio = await paired_rounds(
                    greedy_url, baseline, args.connections, args.seconds, args.rounds
                )
        finally:
            await daemon.close()
    results = {
        "webhook_sync": webhook,
        "bare_aiohttp": bare,
        "ratio_vs_bare": ratio,
        "webhook_sync_4_connections": {k: unqueued[k] for k in ("rps", "p50_ms", "p99_ms")},
        "greedy_route": {"webhook_sync": greedy, "bare_aiohttp": greedy_bare},
        "greedy_ratio_vs_bare": greedy_ratio,
    }
    results["targets"] = {
        "ratio >= 0.3": results["ratio_vs_bare"] >= 0.3,
        "p99 <= 10 ms": webhook["p99_ms"] <= 10,
    }
    report("webhook", results)


if __name__ == "__main__":
    asyncio.run(main())
