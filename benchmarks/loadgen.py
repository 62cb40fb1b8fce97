"""A small closed-loop HTTP load generator: N connections, each sending its next request as
soon as the previous answer arrives. Run in its own process so it doesn't share a loop with
what it measures.

    python benchmarks/loadgen.py URL --connections 32 --seconds 5 [--body JSON] [--header K:V]
prints one JSON line: requests, errors, seconds, rps, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp


async def run(url: str, connections: int, seconds: float, body: bytes | None, headers: dict[str, str]) -> dict:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        # one warm-up round so connection set-up isn't measured
        await asyncio.gather(*(session.post(url, data=body, headers=headers) for _ in range(connections)))
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--body", default="{}")
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    result = asyncio.run(run(args.url, args.connections, args.seconds, args.body.encode(), headers))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
