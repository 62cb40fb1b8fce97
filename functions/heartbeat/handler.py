"""A cron example: a heartbeat that records when it was scheduled and how late it ran.

The event is EventBridge's "Scheduled Event"; `time` is the nominal fire time, so the lag
between it and now is how late the schedule ran (after downtime: a caught-up fire).
"""

from datetime import UTC, datetime


def handler(event, context):
    scheduled = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    lag_s = (datetime.now(UTC) - scheduled).total_seconds()
    print(f"heartbeat for {event['time']} ({lag_s:.3f} s after the scheduled time)")
    return {"scheduled": event["time"], "lag_s": round(lag_s, 3), "rule": event["resources"][0]}
