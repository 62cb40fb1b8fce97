"""The running trigger sources: started together, stopped first, restarted one kind at a time.

Each source (a triggers.base.TriggerSource) runs under triggers.base.supervise() in a task of
its own, keyed by its name (its kind), so a reload can stop and start one kind and leave the
others serving. The daemon reports ready only once every source's `started` is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog

from daemon.metrics import Sample
from triggers.base import Emit, TriggerSource, UpdatableSource, supervise

log = structlog.get_logger("lambdaemon.sources")


class TriggerSources:
    """The supervised sources of one daemon, by name."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._running: dict[str, tuple[TriggerSource, asyncio.Task[None]]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, still releasing

    @property
    def names(self) -> list[str]:
        return list(self._running)

    def get(self, name: str) -> TriggerSource | None:
        entry = self._running.get(name)
        return entry[0] if entry else None

    def samples(self) -> list[Sample]:
        """What the running sources report for GET /metrics (a kind without `samples`: none)."""
        found: list[Sample] = []
        for source, _ in self._running.values():
            if (report := getattr(source, "samples", None)) is not None:
                found.extend(report())
        return found

    def start(self, sources: Iterable[TriggerSource]) -> None:
        """Run each source under supervise(); a name already running is a bug."""
        loop = asyncio.get_running_loop()
        for source in sources:
            assert source.name not in self._running, source.name
            task = loop.create_task(supervise(source, self._emit), name=f"source:{source.name}")
            self._running[source.name] = (source, task)

    def update(self, source: TriggerSource) -> None:
        """Hand a freshly built source's config to the running one of its name, in place."""
        running = self.get(source.name)
        assert isinstance(running, UpdatableSource), source.name
        assert isinstance(source, type(running)), source.name
        running.update(source)

    async def wait_started(self, timeout_s: float, names: Iterable[str] | None = None) -> list[str]:
        """Wait up to `timeout_s` for the sources to start; return the names still not started."""
        waits: dict[str, asyncio.Future[bool]] = {}
        for name in self.names if names is None else names:
            if (source := self.get(name)) is not None:
                waits[name] = asyncio.ensure_future(source.started.wait())
        try:
            if waits:
                await asyncio.wait(waits.values(), timeout=timeout_s)
        finally:  # a shutdown may cut the wait short
            late = [name for name, wait in waits.items() if not wait.done()]
            for wait in waits.values():
                wait.cancel()
        for name in late:
            log.warning("trigger_source_not_started", source=name, waited_s=timeout_s)
        return late

    async def stop(self, names: Iterable[str] | None = None) -> None:
        """Cancel the named sources (default: all) and wait until each has released everything.

        All are cancelled before any is awaited, so they wind down together (the webhook
        listener's in-flight requests finish while MQTT disconnects).
        """
        chosen = self.names if names is None else [n for n in names if n in self._running]
        for name in chosen:
            _, task = self._running.pop(name)
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        # Also those a cancelled earlier stop() left behind: "stopped" means released.
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for name in chosen:
            log.info("trigger_source_stopped", source=name)
