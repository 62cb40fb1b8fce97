"""Chaos benchmark: the crash-safety scenario of tests/test_chaos.py, longer and with more kills.

    .venv/bin/python benchmarks/chaos.py [--seconds 120] [--kills 10] [--seed 1]
        [--mqtt-rate 120] [--webhook-rate 50] [--files-rate 16]
        [--batch-size 20 --batch-window-s 0.05]

Load from all four sources (MQTT QoS 1, async webhooks, file drops, a per-second cron) while the
daemon is SIGKILLed at random moments and restarted; then every acknowledged event must have
exactly one invocation record with a final status. The scenario and the audit are
tests/chaos.py. With --batch-size above 1, the MQTT and file triggers deliver batches
(daemon/batches.py). Writes benchmarks/results/chaos.json (chaos-batch.json with batches); exits
1 if anything was lost or doubled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.chaos import Chaos, run_chaos  # noqa: E402


async def main() -> int:
    defaults = Chaos(Path())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mqtt-rate", type=float, default=defaults.mqtt_rate)
    parser.add_argument("--webhook-rate", type=float, default=defaults.webhook_rate)
    parser.add_argument("--files-rate", type=float, default=defaults.files_rate)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--batch-window-s", type=float, default=0.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lambdaemon-chaos-"))
    try:
        chaos = Chaos(
            tmp,
            seconds=args.seconds,
            kills=args.kills,
            seed=args.seed,
            mqtt_rate=args.mqtt_rate,
            webhook_rate=args.webhook_rate,
            files_rate=args.files_rate,
            settle_timeout_s=60,
            batch_size=args.batch_size,
            batch_window_s=args.batch_window_s,
        )
        report = await run_chaos(chaos)
    finally:
        if args.keep:
            print(f"work folder: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results = {
        "seconds": report.seconds,
        "seed": args.seed,
        "rates_per_s": {
            "mqtt": args.mqtt_rate,
            "webhook": args.webhook_rate,
            "files": args.files_rate,
            "cron": 1,
        },
        "batch_size": args.batch_size,
        "batch_window_s": args.batch_window_s,
        "events": report.events,
        "events_total": sum(report.events.values()),
        "kills": len(report.kills),
        "kills_during_start": sum(k["during_start"] for k in report.kills),
        "lost": sum(map(len, report.lost.values())),
        "duplicates": sum(map(len, report.duplicates.values())),
        "not_final": len(report.not_final),
        "extra_attempts": report.extra_attempts,
        "retried_records": report.retried_records,
        "handler_runs": report.handler_runs,
        "unrecorded_runs": len(report.unrecorded_runs),
        "mqtt_redeliveries_matched": report.mqtt_redeliveries_matched,
        "unaccepted_recorded": report.unaccepted_recorded,
        "not_accepted": report.not_accepted,
        "settled_s": report.settled_s,
        "wall_s": report.wall_s,
        "ok": report.ok,
        "kill_schedule": report.kills,
        "details": {
            "lost": report.lost,
            "duplicates": report.duplicates,
            "not_final": report.not_final[:50],
        },
    }
    out = HERE / "results" / ("chaos-batch.json" if args.batch_size > 1 else "chaos.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in results.items() if k not in ("kill_schedule", "details")}, indent=2
        )
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
