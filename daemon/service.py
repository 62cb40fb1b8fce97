"""The composition root: starts the parts in order, stops them in reverse.

Lifecycle (the `phase` /health reports): starting -> ready <-> reloading -> draining.
- Ready only once recovery is done and the trigger sources have started; then READY=1.
- Shutdown (stop set): STOPPING=1, the dispatcher's drain starts at once (nothing new starts,
  in-flight work gets shutdown_timeout_s, the rest is cancelled and recorded as interrupted),
  sources stop (producers first), the admin API answers 503 "draining" until the drain is
  done, then workers stop and the store closes. `skip_drain` (a second signal) cuts the wait.
- Reload (request_reload: SIGHUP, POST /v1/reload): RELOADING=1, the file is re-read and
  checked, daemon/reload.py says what changed, and only that is swapped; then READY=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from daemon.config import DB_FILE, Config, FunctionConfig, listen_host, load_config
from daemon.datadir import check_data_dir
from daemon.destinations.relay import OutboxRelay
from daemon.dispatcher import Dispatcher
from daemon.errors import ConfigError, StoreOpenError, StoreUnavailableError
from daemon.fleet import Node
from daemon.http.admin import NODE, RELOAD
from daemon.http.api import (
    FAST_ROUTES,
    LIFECYCLE,
    MAX_SYNC_PAYLOAD,
    POOL_HEALTH,
    build_api,
    sdk_environment,
    start_site,
)
from daemon.http.history import DAEMON_SETTINGS
from daemon.http.metrics import METRICS, MetricParts
from daemon.pool import WorkerPool
from daemon.reload import is_blank, needs_force, plan_reload, secret_digests
from daemon.sources import TriggerSources
from daemon.store.health import STORE_HEALTH, StoreHealth
from daemon.store.retention import pruner_for
from daemon.store.sqlite import Store
from daemon.systemd import notify, reloading_message, run_watchdog, watchdog_interval_s
from daemon.versions import Versions
from triggers.registry import build_sources

log = structlog.get_logger("lambdaemon.service")

STARTUP_WAIT_S = 15.0  # for the sources to start (a broker that never answers: aiomqtt's 10 s)
RELOAD_WAIT_S = 5.0  # for restarted sources, to report one that does not come up


class Phase(enum.StrEnum):
    """Where the daemon is in its lifecycle (see the module doc); a reload refusal names it."""

    STARTING = "starting"
    READY = "ready"
    RELOADING = "reloading"
    DRAINING = "draining"


class Service:
    """One running daemon. `run()` serves until `stop` is set, then shuts down in order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ready = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        self.skip_drain = asyncio.Event()  # a second signal: don't wait for in-flight work
        self.phase = Phase.STARTING
        self._deadline = 0.0
        self._draining: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[dict[str, Any]]] = set()
        self._reload_lock = asyncio.Lock()  # one reload at a time; each re-reads the file
        self._secrets = secret_digests(config)  # so a reload can tell a rotated secret file
        self._store: Store | None = None
        self._pool: WorkerPool | None = None
        self._sources: TriggerSources | None = None
        self._versions: Versions | None = None

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        started = time.monotonic()
        db = check_data_dir(config, DB_FILE)  # before anything starts: a clear reason, exit 78
        async with contextlib.AsyncExitStack() as stack:
            store = await _open_store(stack, config, db)
            self._store = store
            node = Node(store, config.store.lease_s)
            stack.push_async_callback(node.leave)  # last before the store closes
            pruner = pruner_for(store, config.daemon)
            await pruner.prepare()  # before anything else writes: it may VACUUM a small file once
            outbox = await stack.enter_async_context(OutboxRelay.open(config, store))
            # The daemon starts no children but workers: it adopts and ends their orphans.
            # Handlers' own boto3 calls reach this daemon's API (sdk_environment), signed with a
            # token of this run's that opens Lambda's function API only.
            invoke_token = secrets.token_urlsafe(24) if config.api.token_file else None
            api_address = [listen_host(config.api.listen, config.path, "api.listen")]
            pool = WorkerPool(
                config.daemon.max_workers,
                config.daemon.log_capture_bytes,
                own_children=True,
                platform_env=lambda: sdk_environment(api_address[-1], invoke_token),
            )
            self._pool = pool
            stack.push_async_callback(pool.close)
            stack.callback(self._stop_watchdog)  # this late: the pings go on through the drain
            versions = self._versions = Versions(
                store,
                config.data_dir,
                keep_versions=config.daemon.keep_versions,
                wheelhouse=config.resolve(config.daemon.wheelhouse)
                if config.daemon.wheelhouse
                else None,
                apply=self._apply_deploy,
                in_use=pool.code_in_use,
                retire=pool.retire,
            )
            await versions.load()
            functions = versions.effective(config.functions)  # deployed code in place
            await pool.start(functions)
            await store.save_memory_sizes(_memory_sizes(functions))
            dispatcher = self.dispatcher = Dispatcher(
                store, pool, functions, on_outbox=outbox.wake, versions=versions
            )
            stack.push_async_callback(self._finish_drain, dispatcher)  # a failed start, too
            dispatcher.fenced = node.fenced
            await node.join()  # before recovering its own rows (daemon/fleet.py)
            await dispatcher.recover()
            # Heartbeats go on through the drain: this node's running rows stay its own.
            await stack.enter_async_context(_background(node.run(dispatcher), "fleet-node"))
            health = StoreHealth(store, dispatcher.deferred)
            await stack.enter_async_context(_background(health.run(), "store-health"))
            await stack.enter_async_context(_background(pruner.run(), "store-pruner"))
            app = build_api(config, dispatcher, store, invoke_token)
            app[STORE_HEALTH] = health
            app[POOL_HEALTH] = pool.start_health
            app[LIFECYCLE] = self._unready_reason
            app[RELOAD] = self.request_reload
            app[METRICS] = metric_parts = MetricParts(pool)
            app[NODE] = node
            app[DAEMON_SETTINGS] = lambda: self.config.daemon  # prices apply on reload
            api = await start_site(
                app,
                config.api.listen,
                "api.listen",
                drain_s=config.daemon.shutdown_timeout_s,
                router=app[FAST_ROUTES],
                max_body=lambda: MAX_SYNC_PAYLOAD,
                limits=lambda: self.config.api,
            )
            stack.push_async_callback(api.cleanup)
            api_address.append(api.addresses[0][:2])  # the bound port, when `listen` said 0
            # Awaited before the API closes, so /health answers "draining" meanwhile.
            stack.push_async_callback(self._finish_drain, dispatcher)
            sources = self._sources = metric_parts.sources = TriggerSources(dispatcher)
            stack.push_async_callback(sources.stop)  # producers stop first
            sources.start(build_sources(config, store))
            await _first(sources.wait_started(STARTUP_WAIT_S), stop.wait())
            if not stop.is_set():
                self._become_ready(started)
                await stop.wait()
            await self._begin_shutdown(dispatcher)
        log.info("daemon_stopped")

    def _become_ready(self, started: float) -> None:
        assert self._sources is not None
        self.phase = Phase.READY
        log.info(
            "daemon_ready",
            functions=len(self.config.functions),
            sources=self._sources.names,
            api=self.config.api.listen,
            startup_ms=round((time.monotonic() - started) * 1000, 1),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        self.ready.set()
        # Everything loaded so far lives as long as the daemon: keep the collector off it, so
        # each collection only walks what invocations allocate.
        gc.freeze()
        notify(f"READY=1\nSTATUS=serving {len(self.config.functions)} functions")
        if interval := watchdog_interval_s():
            self._watchdog = asyncio.get_running_loop().create_task(run_watchdog(interval))

    def _unready_reason(self) -> str | None:
        """Why /health must not say ok now (None: ready), for daemon/http/api.py."""
        return {
            Phase.STARTING: "starting: recovering and starting the trigger sources",
            Phase.RELOADING: "reloading: applying a changed config",
            Phase.DRAINING: "draining: shutting down, in-flight invocations are finishing",
        }.get(self.phase)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    # --- shutdown -------------------------------------------------------------------------------

    async def _begin_shutdown(self, dispatcher: Dispatcher) -> None:
        self.phase = Phase.DRAINING
        self._deadline = time.monotonic() + self.config.daemon.shutdown_timeout_s
        notify("STOPPING=1\nSTATUS=draining")
        log.info("daemon_stopping")
        dispatcher.log_hub.close()  # followed logs end now, not with the listener's drain
        for reload in self._reloads:  # the drain must not race a reload's lane changes
            reload.cancel()
        await asyncio.gather(*self._reloads, return_exceptions=True)
        # Started now, not when the exit stack reaches it: the one deadline counts from here
        # and nothing new starts while the sources stop.
        self._draining = asyncio.get_running_loop().create_task(self._drain(dispatcher))

    async def _finish_drain(self, dispatcher: Dispatcher) -> None:
        if self._draining is None:  # the start failed: nothing waits for in-flight work
            self._deadline = time.monotonic()
            self._draining = asyncio.get_running_loop().create_task(self._drain(dispatcher))
        await self._draining

    async def _drain(self, dispatcher: Dispatcher) -> None:
        # One deadline, set when the shutdown began (a failed start has none left).
        timeout = max(0.0, self._deadline - time.monotonic())
        drain = asyncio.ensure_future(dispatcher.drain(timeout))
        skip = asyncio.ensure_future(self.skip_drain.wait())
        await asyncio.wait({drain, skip}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.warning("drain_skipped")
            await dispatcher.drain(0)
            await drain
        skip.cancel()

    # --- reload ---------------------------------------------------------------------------------

    def request_reload(self, force: bool = False) -> asyncio.Task[dict[str, Any]]:
        """Start a reload (SIGHUP, POST /v1/reload); the task's result is the report.

        Without `force`, a reload that looks like an accident (daemon/reload.py needs_force)
        is refused with the reason and `"needs_force": true`."""
        task = asyncio.get_running_loop().create_task(self._reload(force), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return task

    async def _reload(self, force: bool) -> dict[str, Any]:
        path = self.config.path
        async with self._reload_lock:
            if self.phase is not Phase.READY:
                reason = f"the daemon is {self.phase}"
                log.warning("config_reload_refused", config=path, reason=reason)
                return {"reloaded": False, "config": path, "error": reason}
            self.phase = Phase.RELOADING
            notify(reloading_message())
            try:
                return await self._apply_reload(path, force)
            finally:
                if self.phase is Phase.RELOADING:  # not once a shutdown has begun
                    self.phase = Phase.READY
                    notify(f"READY=1\nSTATUS=serving {len(self.config.functions)} functions")

    async def _apply_reload(self, path: str, force: bool) -> dict[str, Any]:
        assert self.dispatcher and self._pool and self._sources and self._store and self._versions
        try:
            new = await asyncio.to_thread(load_config, path)
            plan = plan_reload(self.config, new, self._secrets)
            blank = await asyncio.to_thread(is_blank, path)
            if (reason := needs_force(self.config, plan, blank_file=blank)) is not None:
                if not force:
                    reason += "; `lambdaemon reload --force` applies it anyway"
                    log.error("config_reload_refused", config=path, reason=reason, forced=False)
                    return {"reloaded": False, "config": path, "error": reason, "needs_force": True}
                log.warning("config_reload_forced", config=path, reason=reason)
            # Built before anything changes: a source's own checks (two routes on one path,
            # MQTT settings) refuse the config like load_config's do.
            fresh = {s.name: s for s in build_sources(plan.config, self._store)}
        except ConfigError as exc:
            log.error("config_reload_refused", config=path, reason=str(exc))
            return {"reloaded": False, "config": path, "error": str(exc), "config_error": True}
        await self._sources.stop(plan.stop)  # producers first
        functions = self._versions.effective(plan.config.functions)  # deployed code stays
        await self.dispatcher.update(functions)
        await self._pool.update(functions)
        await self._store.save_memory_sizes(_memory_sizes(functions))
        for name in plan.update:
            self._sources.update(fresh[name])
        self._sources.start(fresh[name] for name in plan.start)
        self.config, self._secrets = plan.config, plan.secrets
        late = await self._sources.wait_started(RELOAD_WAIT_S, plan.start)
        report = {**plan.summary(), "sources_not_started": late}
        log.info("config_reloaded", config=path, **report)
        if plan.needs_restart:
            log.warning("config_needs_restart", config=path, settings=plan.needs_restart)
        return {"reloaded": True, "config": path, **report}

    async def _apply_deploy(self) -> None:
        """A deploy changed a function's $LATEST code: the dispatcher and the pool take it as
        they take a reload's (running calls finish on the old code, idle workers retire)."""
        assert self.dispatcher and self._pool and self._versions
        if self.phase is Phase.DRAINING:  # committed: the next start runs it
            return
        async with self._reload_lock:
            functions = self._versions.effective(self.config.functions)
            await self.dispatcher.update(functions)
            await self._pool.update(functions)


def _memory_sizes(functions: dict[str, FunctionConfig]) -> dict[str, int]:
    return {name: fn.memory_mb for name, fn in functions.items()}


async def _first(*awaitables: Any) -> None:
    """Return as soon as one of `awaitables` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def _background(coroutine: Any, name: str) -> AsyncIterator[asyncio.Task[Any]]:
    """Run `coroutine` as a task for the duration of the block; cancelled on the way out."""
    task = asyncio.get_running_loop().create_task(coroutine, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _open_store(stack: contextlib.AsyncExitStack, config: Config, db: Path) -> Store:
    """Store.open, entered on `stack`; a database file SQLite cannot use (not a database, a
    newer schema) is a StoreOpenError: exit 65 with the reason, not a traceback.

    With [store] url, the PostgreSQL store instead (daemon/store/pgstore.py, psycopg imported
    only then); a server that cannot be reached at start is a StoreUnavailableError (exit 69).
    """
    if config.store.url is not None:
        return await _open_pg_store(stack, config, db.parent)
    try:
        return await stack.enter_async_context(Store.open(db, config.node_id))
    except (sqlite3.DatabaseError, StoreUnavailableError) as exc:
        raise StoreOpenError(db, str(exc)) from exc


async def _open_pg_store(stack: contextlib.AsyncExitStack, config: Config, data_dir: Path) -> Store:
    from daemon.credentials import store_connection
    from daemon.store.postgres import describe, refusal, require_psycopg

    params = store_connection(config)  # ConfigError: exit 78, as `lambdaemon check` says
    where = describe(params)
    psycopg = require_psycopg(config)
    from daemon.store.pgstore import PgStore

    try:
        return await stack.enter_async_context(
            PgStore.open_url(data_dir, params, where, config.node_id)
        )
    except StoreUnavailableError as exc:  # a schema newer than this lambdaemon knows
        raise StoreOpenError(where, str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise refusal(config, where, exc) from None
