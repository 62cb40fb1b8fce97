"""A small closed-loop HTTP load generator: N connections, each sending its next request as
soon as the previous answer arrives. Run in its own process so it doesn't share a loop with
what it measures.

    python benchmarks/loadgen.py URL --connections 32 --seconds 5 [--body JSON] [--header K:V]
prints one JSON line: requests, errors, seconds, rps, p50_ms, p99_ms. With `wrk` installed
(Debian's package) it drives wrk instead, which leaves more of a small machine's CPU to the
server under test; `--python` forces the pure-Python client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time

import aiohttp


async def run(
    url: str, connections: int, seconds: float, body: bytes | None, headers: dict[str, str]
) -> dict:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        # one warm-up round so connection set-up isn't measured
        await asyncio.gather(
            *(session.post(url, data=body, headers=headers) for _ in range(connections))
        )
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
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
    }


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(
    url: str, connections: int, seconds: float, body: bytes, headers: dict[str, str]
) -> dict:
    lua = "wrk.method = 'POST'\nwrk.body = " + json.dumps(body.decode()) + "\n"
    lua += "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(lua)
        script.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def latency(pct: str) -> float:
        value, unit = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return round(float(value) * _UNITS[unit], 3)

    # wrk says "1.00m" from a minute on
    requests, value, unit = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", out).groups()
    elapsed = float(value) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: .*", out)
    return {
        "tool": "wrk",
        "requests": int(requests),
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(0) if socket_errors else None,
        "seconds": elapsed,
        "rps": round(int(requests) / elapsed, 1),
        "p50_ms": latency(50),
        "p99_ms": latency(99),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--body", default="{}")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument(
        "--python", action="store_true", help="use the Python client even if wrk exists"
    )
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    if shutil.which("wrk") and not args.python:
        result = run_wrk(args.url, args.connections, args.seconds, args.body.encode(), headers)
    else:
        result = asyncio.run(
            run(args.url, args.connections, args.seconds, args.body.encode(), headers)
        )
        result["tool"] = "python"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
