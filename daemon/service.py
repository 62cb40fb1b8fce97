"""The composition root: starts the parts in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from daemon.config import Config
from daemon.dispatcher import Dispatcher
from daemon.health import STORE_HEALTH, StoreHealth
from daemon.http import build_api, start_site
from daemon.pool import WorkerPool
from daemon.retention import Pruner
from daemon.store import Store
from daemon.systemd import notify, run_watchdog, watchdog_interval_s
from triggers.base import supervise
from triggers.registry import build_sources

log = structlog.get_logger("lambdaemon.service")

DB_FILE = "lambdaemon.db"


class Service:
    """One running daemon. `run()` serves until `stop` is set, then shuts down in order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ready = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        self.skip_drain = asyncio.Event()  # a second signal: don't wait for in-flight work
        self._deadline = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            store = await stack.enter_async_context(Store.open(config.data_dir / DB_FILE))
            pruner = Pruner(store, config.daemon)
            await pruner.prepare()  # before anything else writes: it may VACUUM a small file once
            pool = WorkerPool(config.daemon.max_workers, config.daemon.log_capture_bytes)
            stack.push_async_callback(pool.close)
            await pool.start(config.functions)
            dispatcher = self.dispatcher = Dispatcher(store, pool, config.functions)
            stack.push_async_callback(self._drain, dispatcher)
            await dispatcher.recover()
            health = StoreHealth(store)
            await stack.enter_async_context(_background(health.run(), "store-health"))
            await stack.enter_async_context(_background(pruner.run(), "store-pruner"))
            app = build_api(config, dispatcher, store)
            app[STORE_HEALTH] = health
            api = await start_site(app, config.api.listen, "api.listen",
                                   drain_s=config.daemon.shutdown_timeout_s)
            stack.push_async_callback(api.cleanup)
            sources = build_sources(config, store)
            for source in sources:
                await stack.enter_async_context(_supervised(source, dispatcher))
            log.info(
                "daemon_ready", functions=len(config.functions), sources=[s.name for s in sources],
                api=config.api.listen, startup_ms=round((time.monotonic() - started) * 1000, 1),
            )
            self.ready.set()
            notify(f"READY=1\nSTATUS=serving {len(config.functions)} functions")
            interval = watchdog_interval_s()
            if interval:
                watchdog = asyncio.get_running_loop().create_task(run_watchdog(interval))
                stack.callback(watchdog.cancel)
            await stop.wait()
            self._deadline = time.monotonic() + config.daemon.shutdown_timeout_s
            notify("STOPPING=1\nSTATUS=draining")
            log.info("daemon_stopping")
        log.info("daemon_stopped")

    async def _drain(self, dispatcher: Dispatcher) -> None:
        # One budget for the whole drain: what the API's in-flight calls used is gone.
        timeout = max(0.0, self._deadline - time.monotonic())
        drain = asyncio.ensure_future(dispatcher.drain(timeout))
        skip = asyncio.ensure_future(self.skip_drain.wait())
        await asyncio.wait({drain, skip}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.warning("drain_skipped")
            await dispatcher.drain(0)
            await drain
        skip.cancel()


def _supervised(source: Any, dispatcher: Dispatcher) -> Any:
    return _background(supervise(source, dispatcher), f"source:{source.name}")


@contextlib.asynccontextmanager
async def _background(coroutine: Any, name: str):
    """Run `coroutine` as a task for the duration of the block; cancelled on the way out."""
    task = asyncio.get_running_loop().create_task(coroutine, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
