"""Cron benchmark: delay from each nominal fire time to the handler's start.

    .venv/bin/python benchmarks/cron.py [--minutes 2] [--triggers 60]

`--triggers` per-minute schedules fire together at the top of every minute; the delay of each
fire is the record's started_at minus the event's nominal `time`. Target: p99 <= 20 ms.
Writes benchmarks/results/cron.json.
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
    parser.add_argument("--minutes", type=int, default=2)
    parser.add_argument("--triggers", type=int, default=60)
    args = parser.parse_args()
    body = (
        f'[functions.tick]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
        f'concurrency = 4\nmin_warm = 4\n'
    )
    body += '[[functions.tick.triggers]]\ntype = "cron"\nschedule = "* * * * *"\n' * args.triggers
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), body))
        await daemon.start()
        try:
            # fires start at the next minute boundary; wait out the requested minutes, then settle
            end = (int(time.time()) // 60 + 1 + args.minutes) * 60
            await asyncio.sleep(max(0.0, end - time.time()) + 2)
            rows = []
            for row in await daemon.invocations(function="tick"):
                record = await daemon.get(f"/v1/invocations/{row['id']}")
                rows.append(record)
        finally:
            await daemon.close()
    delays = sorted(
        (datetime.fromisoformat(r["started_at"]) - datetime.fromisoformat(r["event"]["time"])).total_seconds() * 1000
        for r in rows if r.get("started_at")
    )
    results = {
        "fires": len(delays), "minutes": args.minutes, "triggers": args.triggers,
        "delay_ms": spread_ms(delays),
    }
    results["targets"] = {"p99 <= 20 ms": results["delay_ms"]["p99"] <= 20}
    report("cron", results)


if __name__ == "__main__":
    asyncio.run(main())
