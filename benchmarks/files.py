"""File-drop benchmark: delay from a rename into the watched folder to the handler's start, and
files per second from `mv` into the folder to `done/`.

    .venv/bin/python benchmarks/files.py [--files 200] [--gap-ms 20] [--burst 10000]
        [--batch-size 1 --batch-window-s 0.05] [--only-burst]

Delay: files are written beside the inbox and renamed in one at a time, `--gap-ms` apart; each
delay is the record's started_at minus the time of its rename. Target: p50 <= 100 ms.

Throughput: `--burst` small files (1 KiB) are written beside the inbox, then renamed in one
after another as fast as `mv` would; the rate is the file count over the time from the first
rename to the last file's arrival in `done/` (counted by listing `done/`). The rename phase's
own rate is beside it, and the daemon's CPU per file (benchmarks/common.py, cpu_of: loop thread,
other threads, workers). With `--batch-size` above 1 the trigger delivers batches. Every file
must end in `done/` once: a file in `failed/` or missing is counted.
Writes benchmarks/results/files.json (files-batch.json with batches).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cpu_delta, cpu_of, machine_share, report, spread_ms  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=20)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--batch-window-s", type=float, default=0.05)
    parser.add_argument("--only-burst", action="store_true", help="skip the delay part")
    args = parser.parse_args()
    batching = (
        f"batch_size = {args.batch_size}\nbatch_window_s = {args.batch_window_s}\n"
        if args.batch_size > 1
        else ""
    )
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        inbox, staging = tmp_path / "inbox", tmp_path / "staging"
        staging.mkdir()
        body = (
            f'[functions.noop]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
            f"concurrency = 4\nmin_warm = 4\n"
            f'[[functions.noop.triggers]]\ntype = "files"\npath = "{inbox}"\npattern = "*.dat"\n'
            f"{batching}"
        )
        daemon = Daemon(write_config(tmp_path, body, daemon="max_workers = 4"))
        await daemon.start()
        try:
            await daemon.wait_for(lambda: _started(daemon))
            if not args.only_burst:
                results["delay"] = await delay(daemon, inbox, staging, args)
            if args.burst:
                results["burst"] = await burst(daemon, inbox, staging, args.burst)
        finally:
            await daemon.close()
    results["batch_size"] = args.batch_size
    targets = {}
    if "delay" in results:
        targets["p50 <= 100 ms"] = results["delay"]["delay_ms"]["p50"] <= 100
    if "burst" in results:
        targets["every file done once"] = results["burst"]["missing"] == 0
    results["targets"] = targets
    report("files-batch" if args.batch_size > 1 else "files", results)


async def delay(daemon: Daemon, inbox: Path, staging: Path, args: argparse.Namespace) -> dict:
    renamed: dict[str, float] = {}
    for i in range(args.files):
        name = f"f{i:05d}.dat"
        (staging / name).write_bytes(b"x" * 1024)
        renamed[name] = time.time()
        (staging / name).rename(inbox / name)
        await asyncio.sleep(args.gap_ms / 1000)  # the drop rate under test, not a wait
    rows = await daemon.wait_for(lambda: _all_done(daemon, args.files), timeout_s=120)
    records = [await daemon.get(f"/v1/invocations/{r['id']}") for r in rows]
    delays = sorted(
        (datetime.fromisoformat(r["started_at"]).timestamp() - renamed[r["event"]["name"]]) * 1000
        for r in records
    )
    return {"files": len(delays), "gap_ms": args.gap_ms, "delay_ms": spread_ms(delays)}


async def burst(daemon: Daemon, inbox: Path, staging: Path, count: int) -> dict:
    done = inbox / "done"
    before = _count(done)
    names = [f"b{i:06d}.dat" for i in range(count)]
    for name in names:
        (staging / name).write_bytes(os.urandom(1024))
    cpu = cpu_of(daemon.proc.pid)
    started = time.perf_counter()
    for name in names:  # what `mv staging/* inbox/` does: one rename(2) per file
        os.rename(staging / name, inbox / name)
    renamed_s = time.perf_counter() - started
    async with asyncio.timeout(600):
        # done/ is filled by the daemon in another process: listed until it holds them all,
        # every 0.1 s (a listing of 10,000 names costs this process milliseconds of CPU).
        while _count(done) - before < count:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    seconds = time.perf_counter() - started
    after = cpu_of(daemon.proc.pid)
    used = cpu_delta(cpu, after, count)
    arrived = {entry.split("_", 1)[1] for entry in os.listdir(done)}
    return {
        "files": count,
        "seconds": round(seconds, 3),
        "files_per_s": round(count / seconds, 1),
        "renames_per_s": round(count / renamed_s, 1),
        "cpu_us_per_file": used,
        "machine": machine_share(cpu, after),
        "missing": sum(name not in arrived for name in names),
        "failed": _count(inbox / "failed"),
    }


def _count(folder: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(folder))
    except FileNotFoundError:
        return 0


async def _started(daemon: Daemon) -> bool:
    return any(e.get("event") == "files_rescanned" for e in daemon.log_events())


async def _all_done(daemon: Daemon, count: int):
    rows = await daemon.invocations(function="noop", status="succeeded")
    return rows if len(rows) >= count else None


if __name__ == "__main__":
    asyncio.run(main())
