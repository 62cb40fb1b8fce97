"""Size retention under sustained sync load: does the store stay within max_db_mb?

    .venv/bin/python benchmarks/retention.py [--seconds 60] [--connections 16] [--max-db-mb 5]

Drives closed-loop sync Invoke load (benchmarks/loadgen.py: wrk when installed) at a no-op
function whose event carries EVENT_BYTES of padding, against a daemon with `max_db_mb` set, and
samples the database file plus its WAL every second during the load and for SETTLE_S after it.
Reports the largest size seen, the size SETTLE_S after the load ended, the intake rate (calls
recorded per second) beside the prune rate (rows the store_pruned lines report per second), and
the rounds of pruning. Writes benchmarks/results/retention.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import loadgen, report  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402

NOOP = HERE / "functions" / "noop"
EVENT_BYTES = 512
SETTLE_S = 10.0  # the size is sampled this long after the load ends
MIB = 1024 * 1024


def disk_bytes(db: Path) -> tuple[int, int]:
    """(database file, WAL) sizes in bytes."""
    sizes = []
    for path in (db, Path(f"{db}-wal")):
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            sizes.append(0)
    return sizes[0], sizes[1]


def load(url: str, connections: int, seconds: float) -> dict:
    body = json.dumps({"pad": "x" * EVENT_BYTES})
    return loadgen(url, connections, seconds, body, {"X-Amz-Invocation-Type": "RequestResponse"})


async def sample(db: Path, until: asyncio.Event, into: list[tuple[float, int, int]]) -> None:
    """db and WAL sizes every second (and at once) until `until` is set."""
    began = time.monotonic()
    while not until.is_set():
        into.append((round(time.monotonic() - began, 1), *disk_bytes(db)))
        try:
            await asyncio.wait_for(until.wait(), 1.0)
        except TimeoutError:
            pass


async def measure(
    seconds: float, connections: int, max_db_mb: int, keep_log: Path | None = None
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        body = (
            f'[functions.noop]\nhandler = "handler.handler"\ncode = "{NOOP}"\n'
            "concurrency = 4\nqueue_size = 1000\n"
        )
        config = write_config(Path(tmp), body, daemon=f"max_db_mb = {max_db_mb}")
        daemon = Daemon(config)
        db = Path(tmp) / "var" / "lambdaemon.db"
        await daemon.start()
        try:
            url = f"{daemon.base}/2015-03-31/functions/noop/invocations"
            samples: list[tuple[float, int, int]] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(db, stop, samples))
            load_started = time.time()
            result = await asyncio.to_thread(load, url, connections, seconds)
            load_ended = time.time()
            during = len(samples)
            await asyncio.sleep(SETTLE_S)  # the settling is what is measured
            stop.set()
            await sampler
            pruned = [
                e
                for e in daemon.log_events()
                if e.get("event") == "store_pruned" and e.get("by_size", 0) > 0
            ]
            log_events = daemon.log_events()
            if keep_log is not None:
                shutil.copyfile(daemon.log_path, keep_log)
        finally:
            await daemon.close()
        with sqlite3.connect(db) as conn:  # what is left: the rest was pruned
            left = conn.execute("SELECT count(*) FROM invocations").fetchone()[0]
    rows_pruned = result["requests"] - result["errors"] - left
    sizes = [(t, (d + w) / MIB, d / MIB, w / MIB) for t, d, w in samples]
    peak = max(sizes, key=lambda s: s[1])
    durations = [e["duration_ms"] for e in pruned]
    return {
        "max_db_mb": max_db_mb,
        "seconds": seconds,
        "connections": connections,
        "event_bytes": EVENT_BYTES,
        "load": result,
        "intake_per_s": round(result["requests"] / (load_ended - load_started), 1),
        "pruned_rows_per_s": round(rows_pruned / (load_ended - load_started), 1),
        "rows_left": left,
        "prune_rounds": sum(e.get("rounds", 1) for e in pruned),
        "prune_round_ms": (
            {
                "mean": round(sum(durations) / sum(e.get("rounds", 1) for e in pruned), 1),
                "max": round(max(e.get("max_round_ms", 0) for e in pruned), 1),
            }
            if durations
            else None
        ),
        "negative_released_bytes": sum(e.get("released_bytes", 0) < 0 for e in pruned),
        "max_mb": round(peak[1], 3),
        "max_at_s": peak[0],
        "max_db_file_mb": round(max(s[2] for s in sizes), 3),
        "max_wal_mb": round(max(s[3] for s in sizes), 3),
        "mb_at_load_end": round(sizes[during - 1][1], 3),
        f"mb_{SETTLE_S:g}s_after_load": round(sizes[-1][1], 3),
        "over_limit_lines": sum(e.get("event") == "store_over_limit" for e in log_events),
        "samples_s_db_wal_mb": [[s[0], round(s[2], 2), round(s[3], 2)] for s in sizes],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--max-db-mb", type=int, default=5)
    parser.add_argument("--log", type=Path, help="keep a copy of the daemon's log here")
    args = parser.parse_args()
    results = asyncio.run(measure(args.seconds, args.connections, args.max_db_mb, args.log))
    report("retention", results)


if __name__ == "__main__":
    main()
