"""Webhook benchmark: a sync no-op route at 32 connections, beside bare aiohttp in the same run.

    .venv/bin/python benchmarks/webhook.py [--seconds 5] [--connections 32] [--rounds 3]
                                           [--greedy-rounds 5] [--routes-only]

Rounds alternate with bare aiohttp (benchmarks/common.py, paired_rounds). Target: throughput
>= 0.3x bare aiohttp, p99 <= 10 ms; the p99 at 4 connections (the route's concurrency, so no
caller waits for a slot) is reported beside it.

Then greedy against exact: the same function through a greedy route (`/api/{proxy+}`, found
after an exact miss and a longer greedy prefix that does not match) in rounds that alternate
with the exact route, in the same daemon. Target: the greedy route's throughput within noise of
the exact route's (its ratio's spread over rounds includes 1). `--routes-only` runs this part
alone. Ratios are medians of the per-round ratios, with their min and max. Beside them,
`route_lookup_us`: what finding each route costs in-process, the only work that differs.
Writes benchmarks/results/webhook.json (webhook-routes.json with --routes-only).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import (  # noqa: E402
    bare_aiohttp,
    loadgen,
    paired_rounds,
    ratio_spread,
    report,
)
from tests.daemon_proc import Daemon, free_port, write_config  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--greedy-rounds", type=int, default=5)
    parser.add_argument("--routes-only", action="store_true", help="greedy against exact only")
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
            results = await measure(port, args)
        finally:
            await daemon.close()
    report("webhook-routes" if args.routes_only else "webhook", results)


async def measure(port: int, args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{port}/hooks/noop"
    greedy_url = f"http://127.0.0.1:{port}/api/items/42"
    await asyncio.to_thread(loadgen, url, 4, 1)  # warm the workers
    results: dict = {}
    if not args.routes_only:
        async with bare_aiohttp() as baseline:
            webhook, bare, _ = await paired_rounds(
                url, baseline, args.connections, args.seconds, args.rounds
            )
        unqueued = await asyncio.to_thread(loadgen, url, 4, args.seconds)
        results = {
            "webhook_sync": webhook,
            "bare_aiohttp": bare,
            "ratio_vs_bare": ratio_spread(webhook, bare)["median"],
            "ratio_vs_bare_spread": ratio_spread(webhook, bare),
            "webhook_sync_4_connections": {k: unqueued[k] for k in ("rps", "p50_ms", "p99_ms")},
        }
    greedy, exact, _ = await paired_rounds(
        greedy_url, url, args.connections, args.seconds, args.greedy_rounds
    )
    spread = ratio_spread(greedy, exact)
    results["greedy_vs_exact"] = {
        "greedy": greedy,
        "exact": exact,
        "ratio": spread,
        "route_lookup_us": lookup_us(),
    }
    targets = {"greedy within noise of exact": spread["min"] <= 1 <= spread["max"]}
    if not args.routes_only:
        targets["ratio >= 0.3"] = results["ratio_vs_bare"] >= 0.3
        targets["p99 <= 10 ms"] = results["webhook_sync"]["p99_ms"] <= 10
    results["targets"] = targets
    return results


def lookup_us() -> dict[str, float]:
    """What finding the route costs in-process, per request, on the benchmark's four routes: the
    part of the work that differs between the two paths, measured without the VM's HTTP noise."""
    from triggers.webhook import NoCheck, Route, RouteTable, parse_path

    routes = []
    for path in ("/hooks/noop", "/api/{proxy+}", "/api/admin/*", "/static/*"):
        resource, param = parse_path(path)
        prefix = resource.rpartition("/")[0] + "/" if param else resource
        routes.append(
            Route(
                "noop", "t", path, "sync", NoCheck(), resource=resource, param=param, prefix=prefix
            )
        )
    table = RouteTable(routes)
    assert table.find("/api/items/42", "POST") is routes[1]
    calls = 200_000
    return {
        name: round(
            min(timeit.repeat(lambda p=path: table.find(p, "POST"), number=calls, repeat=5))
            / calls
            * 1e6,
            3,
        )
        for name, path in (("exact", "/hooks/noop"), ("greedy", "/api/items/42"))
    }


if __name__ == "__main__":
    asyncio.run(main())
