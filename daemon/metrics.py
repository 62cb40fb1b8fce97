"""What the daemon counts for GET /metrics, as plain numbers where the event happens.

The hot path only adds to ints here (no lock, no label lookup): a lane counts its function's
invocations, durations, retries, dead letters and throttles (FunctionCounts), the store its
commit latency (Histogram). daemon/http/metrics.py, the only module that imports
prometheus-client, reads these and the daemon's own state when it is scraped. Label values
are names from the config (function, trigger kind, route, folder) or the daemon's own
constants (status, state), never text from a request.

This module imports nothing of the daemon, so every part can count through it.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import NamedTuple

# Upper bounds in seconds, Prometheus' base unit (each bucket counts values <= its bound).
# Few enough that 50 functions' histograms scrape in milliseconds (docs/benchmarks.md).
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0)
INIT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Histogram:
    """Counts per bucket (the last one: above every bound) and the sum of observed values."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' buckets: (upper bound as text, count of values at or below it)."""
        total, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class FunctionCounts:
    """One function's counters since the daemon started, kept by its lane."""

    __slots__ = (
        "finished",
        "duration",
        "init_duration",
        "cold_starts",
        "retries",
        "dead_letters",
        "throttles",
    )

    def __init__(self) -> None:
        # (trigger kind, final status) -> invocations that ended so (retries are not final).
        self.finished: dict[tuple[str, str], int] = {}
        self.duration = Histogram(DURATION_BUCKETS_S)  # every attempt that ran
        self.init_duration = Histogram(INIT_BUCKETS_S)  # every cold start's init
        self.cold_starts = 0
        self.retries = 0  # attempts scheduled again after a failure
        self.dead_letters = 0
        self.throttles = 0  # sync calls refused with 429: the wait queue was full

    def finish(self, trigger: str, status: str) -> None:
        key = (trigger, status)
        self.finished[key] = self.finished.get(key, 0) + 1

    def ran(self, duration_ms: float, init_duration_ms: float | None) -> None:
        """One attempt's run: its duration, and its init when it started a worker."""
        self.duration.observe(duration_ms / 1000)
        if init_duration_ms is not None:
            self.cold_starts += 1
            self.init_duration.observe(init_duration_ms / 1000)


class Sample(NamedTuple):
    """One value a trigger source reports (see SOURCE_METRICS for the names it may use)."""

    name: str
    labels: dict[str, str]
    value: float


# The metrics trigger sources report through `samples()`: name -> (type, help, label names).
SOURCE_METRICS = {
    "lambdaemon_mqtt_connected": (
        "gauge",
        "1 while the MQTT client is connected and subscribed",
        (),
    ),
    "lambdaemon_cron_last_fire_timestamp_seconds": (
        "gauge",
        "Nominal time of the trigger's last fire committed by this run (Unix seconds)",
        ("function", "trigger"),
    ),
    "lambdaemon_files_pending": (
        "gauge",
        "Files seen in a watched folder and not claimed yet: not complete, or a namesake in flight",
        ("folder",),
    ),
    "lambdaemon_files_processing": (
        "gauge",
        "Files claimed from a watched folder whose invocation has not finished",
        ("folder",),
    ),
    "lambdaemon_webhook_auth_failures_total": (
        "counter",
        "Webhook requests refused by their route's auth check",
        ("route",),
    ),
    "lambdaemon_webhook_rejected_total": (
        "counter",
        "Webhook requests refused, by reason",
        ("reason",),
    ),
}
