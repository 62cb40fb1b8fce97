"""File-drop benchmark: delay from a rename into the watched folder to the handler's start.

    .venv/bin/python benchmarks/files.py [--files 200] [--gap-ms 20]

Files are written beside the inbox and renamed in one at a time, `--gap-ms` apart; each delay is
the record's started_at minus the time of its rename. Target: p50 <= 100 ms.
Writes benchmarks/results/files.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import report, spread_ms  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        inbox, staging = tmp_path / "inbox", tmp_path / "staging"
        staging.mkdir()
        body = (
            f'[functions.noop]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
            f"concurrency = 4\nmin_warm = 4\n"
            f'[[functions.noop.triggers]]\ntype = "files"\npath = "{inbox}"\npattern = "*.dat"\n'
        )
        daemon = Daemon(write_config(tmp_path, body))
        await daemon.start()
        renamed: dict[str, float] = {}
        try:
            await daemon.wait_for(lambda: _started(daemon))
            for i in range(args.files):
                name = f"f{i:05d}.dat"
                (staging / name).write_bytes(b"x" * 1024)
                renamed[name] = time.time()
                (staging / name).rename(inbox / name)
                await asyncio.sleep(args.gap_ms / 1000)  # the drop rate under test, not a wait
            rows = await daemon.wait_for(lambda: _all_done(daemon, args.files), timeout_s=120)
            records = [await daemon.get(f"/v1/invocations/{r['id']}") for r in rows]
        finally:
            await daemon.close()
    delays = sorted(
        (datetime.fromisoformat(r["started_at"]).timestamp() - renamed[r["event"]["name"]]) * 1000
        for r in records
    )
    results = {
        "files": len(delays),
        "gap_ms": args.gap_ms,
        "delay_ms": spread_ms(delays),
    }
    results["targets"] = {"p50 <= 100 ms": results["delay_ms"]["p50"] <= 100}
    report("files", results)


async def _started(daemon: Daemon) -> bool:
    return any(e.get("event") == "files_rescanned" for e in daemon.log_events())


async def _all_done(daemon: Daemon, count: int):
    rows = await daemon.invocations(function="noop", status="succeeded")
    return rows if len(rows) >= count else None


if __name__ == "__main__":
    asyncio.run(main())
