"""Cron benchmark: delay from each nominal fire time to the handler's start.

    .venv/bin/python benchmarks/cron.py [--seconds 60]

One per-second schedule (the 6-field form) fires for `--seconds`; the delay of each fire is the
record's started_at minus the event's nominal `time`: the wake-up, the commit of the fire and
the dispatch to a warm worker. Target: p99 <= 20 ms. Writes benchmarks/results/cron.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import report, spread_ms  # noqa: E402
from tests.daemon_proc import Daemon, write_config  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    body = (
        f'[functions.tick]\nhandler = "handler.handler"\ncode = "{HERE / "functions" / "noop"}"\n'
        'min_warm = 1\n[[functions.tick.triggers]]\ntype = "cron"\nschedule = "* * * * * *"\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(write_config(Path(tmp), body))
        await daemon.start()
        try:
            await asyncio.sleep(args.seconds + 1)  # the span measured, not a synchronisation
            rows = []
            for row in await daemon.invocations(function="tick"):
                record = await daemon.get(f"/v1/invocations/{row['id']}")
                rows.append(record)
        finally:
            await daemon.close()
    delays = sorted(
        (
            datetime.fromisoformat(r["started_at"]) - datetime.fromisoformat(r["event"]["time"])
        ).total_seconds()
        * 1000
        for r in rows
        if r.get("started_at")
    )
    results = {
        "fires": len(delays),
        "seconds": args.seconds,
        "delay_ms": spread_ms(delays),
    }
    results["targets"] = {"p99 <= 20 ms": results["delay_ms"]["p99"] <= 20}
    report("cron", results)


if __name__ == "__main__":
    asyncio.run(main())
