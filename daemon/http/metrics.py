"""GET /metrics: the daemon in Prometheus' text format, made by prometheus-client.

This is the one module that imports prometheus-client, and it does so on the first scrape:
a daemon nobody scrapes does not carry the library (about 1.5 MB). Nothing is counted through
the library on the hot path. Its registry holds the process collector and one collector of
ours, which reads at scrape time what the daemon keeps anyway: the lanes' counts and queues
(daemon/metrics.py, daemon/lanes.py), the pool's workers, the store's commit figures and file
sizes, the listeners' connection counts and the trigger sources' own samples. Every label
value is a name from the config or one of the daemon's constants (see daemon/metrics.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from daemon.errors import StoreUnavailableError
from daemon.http.admin import DISPATCHER, STORE
from daemon.http.wire import STATS, AnyRequest
from daemon.metrics import SOURCE_METRICS, Histogram

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from daemon.dispatcher import Dispatcher
    from daemon.pool import WorkerPool
    from daemon.sources import TriggerSources
    from daemon.store.sqlite import Store

# The text format every Prometheus server reads (prometheus-client's generate_latest writes it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricParts:
    """What GET /metrics reads beside the app's dispatcher and store; the service sets
    `sources` once they run (an app's keys cannot change once it serves)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.sources: TriggerSources | None = None
        self.registry: CollectorRegistry | None = None  # made on the first scrape
        self.collector: DaemonCollector | None = None


METRICS: web.AppKey[MetricParts] = web.AppKey("metrics", MetricParts)


async def metrics(request: AnyRequest) -> web.Response:
    """The daemon's metrics; 404 on an API built without the service's parts."""
    parts = request.app.get(METRICS)
    if parts is None:
        return web.json_response({"error": "this API has no daemon to measure"}, status=404)
    from prometheus_client import generate_latest  # on the first scrape only (module doc)

    if parts.registry is None or parts.collector is None:
        parts.registry, parts.collector = _registry(request.app, parts)
    store = request.app[STORE]
    try:
        parts.collector.outbox = await store.count_outbox()
    except StoreUnavailableError:
        parts.collector.outbox = None
    return web.Response(
        body=generate_latest(parts.registry), headers={"Content-Type": CONTENT_TYPE}
    )


def _registry(
    app: web.Application, parts: MetricParts
) -> tuple[CollectorRegistry, DaemonCollector]:
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    collector = DaemonCollector(app[DISPATCHER], app[STORE], parts)
    registry.register(collector)  # a collector is any object with collect()
    return registry, collector


class DaemonCollector:
    """Reads the daemon's state into metric families at each scrape."""

    def __init__(self, dispatcher: Dispatcher, store: Store, parts: MetricParts) -> None:
        self._dispatcher, self._store, self._parts = dispatcher, store, parts
        self.outbox: dict[str, int] | None = None  # read (async) just before the scrape

    def collect(self) -> Iterator[Metric]:
        yield from self._functions()
        yield from self._workers()
        yield from self._store_figures()
        yield from self._listeners()
        yield from self._sources()

    def _functions(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily as Counter
        from prometheus_client.core import GaugeMetricFamily as Gauge

        fn = ["function"]
        invocations = Counter(
            "lambdaemon_invocations",
            "Invocations that reached a final status, by trigger kind and status",
            labels=["function", "trigger", "status"],
        )
        duration = _histogram(
            "lambdaemon_invocation_duration_seconds", "Duration of every attempt that ran"
        )
        init = _histogram("lambdaemon_init_duration_seconds", "Init duration of cold starts")
        counters = {
            "cold_starts": Counter(
                "lambdaemon_cold_starts", "Attempts that started a worker", labels=fn
            ),
            "retries": Counter(
                "lambdaemon_retries", "Failed async attempts scheduled again", labels=fn
            ),
            "dead_letters": Counter(
                "lambdaemon_dead_letters", "Invocations dead-lettered by this run", labels=fn
            ),
            "throttles": Counter(
                "lambdaemon_throttles", "Sync calls refused with 429 (wait queue full)", labels=fn
            ),
        }
        gauges = {
            "running": Gauge(
                "lambdaemon_invocations_running", "Invocations running now", labels=fn
            ),
            "waiting": Gauge(
                "lambdaemon_invocations_waiting", "Sync callers waiting for a slot", labels=fn
            ),
            "backlog": Gauge(
                "lambdaemon_invocations_queued",
                "Async invocations due, waiting for a slot",
                labels=fn,
            ),
            "retrying": Gauge(
                "lambdaemon_invocations_retrying",
                "Async invocations waiting for their retry",
                labels=fn,
            ),
        }
        for name, lane in sorted(self._dispatcher.lanes().items()):
            counts = lane.counts
            for (trigger, status), n in sorted(counts.finished.items()):
                invocations.add_metric([name, trigger, status], n)
            _add(duration, name, counts.duration)
            if counts.cold_starts:  # no series for what has not happened yet
                _add(init, name, counts.init_duration)
            for key, family in counters.items():
                family.add_metric([name], getattr(counts, key))
            for key, value in lane.stats().items():
                gauges[key].add_metric([name], value)
        yield invocations
        yield duration
        yield init
        yield from counters.values()
        yield from gauges.values()

    def _workers(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily as Gauge

        pool = self._parts.pool
        workers = Gauge(
            "lambdaemon_workers",
            "Worker processes by state (warm = idle + busy)",
            labels=["function", "state"],
        )
        # Only what exists: most of a big config's functions have no worker most of the time.
        for (name, state), count in sorted(pool.worker_states().items()):
            workers.add_metric([name, state], count)
        yield workers
        yield Gauge(
            "lambdaemon_max_workers", "The pool's cap on worker processes", pool.max_workers
        )

    def _store_figures(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily as Counter
        from prometheus_client.core import GaugeMetricFamily as Gauge

        store = self._store
        commit = _histogram(
            "lambdaemon_store_commit_duration_seconds",
            "Time of each group commit (one transaction in the database thread)",
            labels=[],
        )
        _add(commit, None, store.commit_seconds)
        yield commit
        yield Counter("lambdaemon_store_commits", "Transactions committed", store.commits)
        yield Counter(
            "lambdaemon_store_write_failures", "Batches that could not commit", store.write_failures
        )
        if store.backend == "sqlite":  # PostgreSQL's files are the server's
            path = str(store.path)
            yield Gauge("lambdaemon_store_database_bytes", "Size of the database file", _size(path))
            yield Gauge(
                "lambdaemon_store_wal_bytes", "Size of the write-ahead log", _size(f"{path}-wal")
            )
        if self.outbox is not None:
            outbox = Gauge(
                "lambdaemon_outbox_records",
                "Destination records in the outbox: pending delivery, or failed for good",
                labels=["status"],
            )
            for status in ("pending", "failed"):
                outbox.add_metric([status], self.outbox.get(status, 0))
            yield outbox

    def _listeners(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily as Counter
        from prometheus_client.core import GaugeMetricFamily as Gauge

        listener = ["listener"]
        open_ = Gauge(
            "lambdaemon_http_connections_open", "Open client connections", labels=listener
        )
        accepted = Counter("lambdaemon_http_connections", "Connections accepted", labels=listener)
        bad = Counter(
            "lambdaemon_http_bad_requests",
            "Requests refused as malformed",
            labels=["listener", "kind"],
        )
        for key, stats in sorted(STATS.items()):
            name = key.partition(".")[0]
            open_.add_metric([name], stats.open)
            accepted.add_metric([name], stats.accepted)
            for kind, n in sorted(stats.bad.items()):
                bad.add_metric([name, kind], n)
        yield from (open_, accepted, bad)

    def _sources(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sources = self._parts.sources
        samples = sources.samples() if sources is not None else []
        families: dict[str, Any] = {}
        for sample in samples:
            kind, help_text, labels = SOURCE_METRICS[sample.name]
            family = families.get(sample.name)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[sample.name] = cls(sample.name, help_text, labels=list(labels))
            family.add_metric([sample.labels[label] for label in labels], sample.value)
        yield from families.values()


def _histogram(name: str, help_text: str, labels: list[str] | None = None) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, help_text, labels=["function"] if labels is None else labels)


def _add(family: Any, label: str | None, histogram: Histogram) -> None:
    family.add_metric([] if label is None else [label], histogram.cumulative(), histogram.sum)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
