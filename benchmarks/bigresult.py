"""Big results: the daemon's memory before, during and after results near and over Lambda's limit.

    .venv/bin/python -m benchmarks.bigresult [--calls 20] [--samples 5]

A handler returns a string of a chosen size through the sync Invoke API. Measured, as the
daemon's RSS (the workers are separate processes and not counted):
- idle: after one small call (a warm worker, nothing big seen yet);
- after `--calls` results of 20 MB (over the 6,291,556-byte limit: each is refused in the worker
  with Function.ResponseSizeTooLarge, so only an error crosses the channel);
- after `--calls` results exactly at the limit (6 MB each crosses the channel, goes into the
  store and out as the HTTP answer);
- after recovery: one second idle and `--calls` small calls more.
Each figure is sampled `--samples` times (RSS moves a little as the store's thread works).
Writes benchmarks/results/bigresult.json.
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

from benchmarks.common import report  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402

FUNCTION = HERE / "functions" / "bigresult"
LIMIT = 6_291_556  # Lambda's response payload limit, in bytes of JSON
OVER = 20 * 1024 * 1024


def functions_toml() -> str:
    return f'[functions.big]\nhandler = "handler.handler"\ncode = "{FUNCTION}"\nmemory_mb = 512\n'


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample(pid: int, samples: int) -> dict[str, float]:
    """The daemon's RSS `samples` times, 0.1 s apart: median, min and max."""
    values = []
    for i in range(samples):
        if i:
            await asyncio.sleep(0.1)  # spacing between samples, not synchronisation
        values.append(rss_mb(pid))
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


async def calls(daemon: Daemon, size: int, n: int) -> dict[str, object]:
    """`n` sync calls returning `size` characters; their statuses, error types and duration."""
    statuses, errors, started = set(), set(), time.perf_counter()
    for _ in range(n):
        status, headers, body = await daemon.invoke("big", {"bytes": size})
        statuses.add(status)
        if "X-Amz-Function-Error" in headers:
            errors.add(json.loads(body).get("errorType"))
        elif size:
            assert len(body) == size + 2, len(body)
    return {
        "statuses": sorted(statuses),
        "error_types": sorted(errors),
        "ms_per_call": round((time.perf_counter() - started) * 1000 / n, 1),
    }


async def measure(daemon: Daemon, n: int, samples: int) -> dict[str, object]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    results: dict[str, object] = {}
    await calls(daemon, 10, 3)
    results["idle_rss_mb"] = await sample(pid, samples)
    results["over_limit"] = await calls(daemon, OVER, n)
    results["after_over_limit_rss_mb"] = await sample(pid, samples)
    results["at_limit"] = await calls(daemon, LIMIT - 2, n)
    results["after_at_limit_rss_mb"] = await sample(pid, samples)
    await asyncio.sleep(1)  # the recovery period being measured
    await calls(daemon, 10, n)
    results["after_recovery_rss_mb"] = await sample(pid, samples)
    idle = results["idle_rss_mb"]["median"]  # type: ignore[index]
    results["growth_mb"] = {
        key: round(results[f"after_{key}_rss_mb"]["median"] - idle, 1)  # type: ignore[index]
        for key in ("over_limit", "at_limit", "recovery")
    }
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="calls of each size (default 20)")
    parser.add_argument("--samples", type=int, default=5, help="RSS samples per figure")
    parser.add_argument("--no-write", action="store_true", help="print only, keep results/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), functions_toml()))
        await daemon.start()
        try:
            results = await measure(daemon, args.calls, args.samples)
        finally:
            await daemon.close()
    results["targets"] = {
        "back within 10 MB of idle after recovery": results["growth_mb"]["recovery"] <= 10,  # type: ignore[index]
    }
    if args.no_write:
        print(json.dumps(results, indent=2))
    else:
        report("bigresult", results)


if __name__ == "__main__":
    asyncio.run(main())
