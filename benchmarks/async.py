"""Async intake benchmark: Invoke `Event` and an async webhook at 32 connections, beside bare
aiohttp in the same run, and whether the queue drains at the rate it fills.

    .venv/bin/python benchmarks/async.py [--seconds 5] [--connections 32] [--rounds 3]
        [--concurrency 4]

Each round loads one async path with a no-op event (`InvocationType=Event` through the Invoke
API, then a `mode = "async"` webhook route), waits until every event it accepted has its final
record, then loads bare aiohttp (benchmarks/bare_aiohttp.py) the same way; the paths alternate
with the baseline, as this shared machine's speed drifts. Throughput is accepted (202) events
per second; the ratio is the median of the per-round ratios to the bare round right after, with
its min and max. Target: >= 0.5x bare aiohttp. `drain_ratio_vs_bare` is the same for the
drain rate: what the daemon sustains for as long as the load lasts.

Draining, from the daemon's own timestamps in its SQLite file: intake rate = events over the
time from the round's first accept to its last (queued_at); drain rate = events over the time
from the first accept to the last final record (ended_at); `drain_tail_s` = last final record
minus last accept. A queue that keeps up has a drain rate near the intake rate and a tail of a
few milliseconds; one that does not has a tail that grows with the round.

CPU per event (benchmarks/common.py, cpu_of): the daemon's loop thread, its other threads (the
SQLite writer and readers) and its workers, from the round's start to its last final record;
bare aiohttp's CPU per request beside it; and the share of all cores busy (and stolen by the
hypervisor) in each round, and the store's group commits (how many, their mean time, events
per commit, from GET /metrics). Writes benchmarks/results/async.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import (  # noqa: E402
    bare_aiohttp_server,
    commit_figures,
    cpu_delta,
    cpu_of,
    loadgen,
    machine_share,
    report,
    store_commits,
)
from tests.daemon_proc import Daemon, free_port, write_config  # noqa: E402

FINAL = ("succeeded", "failed", "timed_out", "crashed")


def config(port: int, concurrency: int) -> str:
    return (
        f'[webhooks]\nlisten = "127.0.0.1:{port}"\n'
        f'[functions.noop]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
        f"concurrency = {concurrency}\nmin_warm = {concurrency}\n"
        '[[functions.noop.triggers]]\ntype = "webhook"\npath = "/hooks/async"\nmode = "async"\n'
    )


def counts(db: Path, trigger: str) -> tuple[int, int]:
    """(rows, final rows) of `trigger`'s async invocations."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows, final = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status IN (?, ?, ?, ?)) FROM invocations"
            " WHERE trigger = ? AND invocation_type = 'async'",
            (*FINAL, trigger),
        ).fetchone()
    return rows, final


def timings(db: Path, trigger: str, after: int) -> dict:
    """The daemon's timestamps of `trigger`'s rows past the first `after` (in queued order)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT queued_at, ended_at, status FROM invocations"
            " WHERE trigger = ? AND invocation_type = 'async' ORDER BY queued_at LIMIT -1 OFFSET ?",
            (trigger, after),
        ).fetchall()
    queued = [q for q, _, _ in rows]
    ended = [e for _, e, _ in rows if e is not None]
    intake_s = max(queued) - min(queued)
    drained_s = max(ended) - min(queued)
    return {
        "events": len(rows),
        "succeeded": sum(s == "succeeded" for _, _, s in rows),
        "intake_per_s": round(len(rows) / intake_s, 1),
        "drain_per_s": round(len(rows) / drained_s, 1),
        "drain_tail_s": round(max(ended) - max(queued), 3),
    }


async def drained(db: Path, trigger: str, timeout_s: float = 300) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            rows, final = await asyncio.to_thread(counts, db, trigger)
            if rows == final:
                return
            await asyncio.sleep(0.02)  # polling the file from outside the daemon, bounded


async def round_of(
    daemon: Daemon, db: Path, url: str, trigger: str, headers: dict[str, str], args
) -> dict:
    before_rows, _ = await asyncio.to_thread(counts, db, trigger)
    commits = await store_commits(daemon.base)
    cpu = cpu_of(daemon.proc.pid)
    load = await asyncio.to_thread(loadgen, url, args.connections, args.seconds, "{}", headers)
    await drained(db, trigger)
    after = cpu_of(daemon.proc.pid)
    figures = await asyncio.to_thread(timings, db, trigger, before_rows)
    committed = commit_figures(commits, await store_commits(daemon.base), figures["events"])
    return {
        "rps": load["rps"],
        "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"],
        "errors": load["errors"],
        **figures,
        "cpu_us_per_event": cpu_delta(cpu, after, figures["events"]),
        "machine": machine_share(cpu, after),
        "store_commits": committed,
    }


async def bare_round(pid: int, url: str, args) -> dict:
    cpu = cpu_of(pid)
    load = await asyncio.to_thread(loadgen, url, args.connections, args.seconds)
    after = cpu_of(pid)
    used = cpu_delta(cpu, after, int(load["requests"]))
    return {
        "machine": machine_share(cpu, after),
        "rps": load["rps"],
        "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"],
        "cpu_us_per_request": used["loop"] + used["threads"],
    }


def summary(ours: list[dict], bare: list[dict]) -> dict:
    ratios = [a["rps"] / b["rps"] for a, b in zip(ours, bare, strict=True)]
    # What the daemon sustains: events run to their final record per second, against bare.
    drained = [a["drain_per_s"] / b["rps"] for a, b in zip(ours, bare, strict=True)]
    keep = ("rps", "p50_ms", "p99_ms", "intake_per_s", "drain_per_s", "drain_tail_s")
    return {
        **{key: round(statistics.median(r[key] for r in ours), 3) for key in keep},
        "not_succeeded": sum(r["events"] - r["succeeded"] for r in ours),
        "cpu_us_per_event": {
            part: round(statistics.median(r["cpu_us_per_event"][part] for r in ours), 1)
            for part in ours[0]["cpu_us_per_event"]
        },
        "ratio_vs_bare": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        "drain_ratio_vs_bare": {
            "median": round(statistics.median(drained), 3),
            "min": round(min(drained), 3),
            "max": round(max(drained), 3),
        },
        "machine_busy": round(statistics.median(r["machine"]["busy"] for r in ours), 3),
        "drain_vs_intake": round(
            statistics.median(r["drain_per_s"] / r["intake_per_s"] for r in ours), 3
        ),
        "rounds": ours,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(
            write_config(Path(tmp), config(port, args.concurrency), daemon="max_workers = 8")
        )
        await daemon.start()
        db = Path(tmp) / "var" / "lambdaemon.db"
        paths = {
            "invoke_event": (
                f"{daemon.base}/2015-03-31/functions/noop/invocations",
                "api",
                {"X-Amz-Invocation-Type": "Event"},
            ),
            "webhook_async": (f"http://127.0.0.1:{port}/hooks/async", "webhook", {}),
        }
        ours: dict[str, list[dict]] = {name: [] for name in paths}
        bare: dict[str, list[dict]] = {name: [] for name in paths}
        try:
            async with bare_aiohttp_server() as (baseline, server):
                for url, trigger, headers in paths.values():  # warm-up, not counted
                    await asyncio.to_thread(loadgen, url, 4, 1, "{}", headers)
                    await drained(db, trigger)
                for _ in range(args.rounds):
                    for name, (url, trigger, headers) in paths.items():
                        ours[name].append(await round_of(daemon, db, url, trigger, headers, args))
                        bare[name].append(await bare_round(server, baseline, args))
        finally:
            await daemon.close()
    results: dict = {name: summary(ours[name], bare[name]) for name in paths}
    every_bare = [r for rounds in bare.values() for r in rounds]
    results["bare_aiohttp"] = {
        "rps": round(statistics.median(r["rps"] for r in every_bare), 1),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in every_bare), 3),
        "cpu_us_per_request": round(
            statistics.median(r["cpu_us_per_request"] for r in every_bare), 1
        ),
        "rounds": bare,
    }
    results["connections"], results["concurrency"] = args.connections, args.concurrency
    results["targets"] = {
        f"{name} >= 0.5x bare": results[name]["ratio_vs_bare"]["median"] >= 0.5 for name in paths
    }
    report("async", results)


if __name__ == "__main__":
    asyncio.run(main())
