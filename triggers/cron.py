"""Cron schedules (placeholder until the cron source lands): schedule parsing only."""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger


def parse_schedule(schedule: str, timezone: str) -> CronTrigger:
    """A CronTrigger for a 5-field expression; raises ValueError with the reason."""
    return CronTrigger.from_crontab(schedule, timezone=timezone)
