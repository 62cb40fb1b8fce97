"""Parent side of the worker pool: hands out, times out, evicts, recycles and reaps workers.

A worker is one process for one function configuration, serving one invocation at a time (its
process is process.py, the child side worker.py, the frames protocol.py). Everything runs on the
daemon's event loop: no threads, one guard timer per busy worker, one small task per worker
waiting for its exit.

Slots: a call or a min_warm start reserves a slot before its worker exists; from then on every
way out gives it back: a start that fails before the process exists unreserves it at once (and the
call gets an Outcome, see starts.py), and a process, once it exists, frees it when it is reaped.

Log events: worker_started, worker_init_failed, handler_output (one per captured line) and
worker_stopped with reason idle | evicted | timeout | crashed | retired | recycled | closed |
cancelled | init_failed | out_of_memory (recycled also says why: max_invocations, rss or
handler_state); starts.py's worker_start_failed, pool_degraded and pool_restored; and
descendants.py's orphans_killed. worker_started and worker_stopped name the function and
its version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast

import structlog

from daemon.config import FunctionConfig
from daemon.errors import PoolClosedError
from daemon.memory import BIG_PAYLOAD_BYTES, trim_soon
from daemon.models import InvokeRequest, Outcome, Status
from daemon.pool.descendants import LIVE_MARKS, WORKER_PIDS, Orphans, become_subreaper
from daemon.pool.outcomes import (
    call_outcome,
    crashed,
    error_payload,
    exit_status,
    kb_to_mb,
    peak_memory_kb,
    timed_out,
)
from daemon.pool.process import (
    TIMED_OUT,
    Instance,
    Key,
    State,
    Worker,
    bootstrap_path,
    capture_file,
    new_log_stream,
    serves_runtime_api,
    start_process,
    use_pidfd_child_watcher,
)
from daemon.pool.protocol import InitFailed, Invoke, Ready, Result
from daemon.pool.runtime_channel import RuntimeChannel
from daemon.pool.sandbox import worker_returncode
from daemon.pool.starts import WORKER_START_FAILED, StartHealth, start_error

log = structlog.get_logger("lambdaemon.pool")

INIT_TIMEOUT_S = 10.0  # Lambda's limit for the init phase
_EXIT_WAIT_S = 5.0
_CRASH_GRACE_S = 1.0  # after EOF on the channel, how long a worker may take to finish exiting
_SWEEP_AGAIN_S = 0.1  # after a sweep killed orphans: the next one reaps them
_SWEEP_INTERVAL_S = 10.0  # the daemon's sweep for orphans that exited on their own
LATEST = "$LATEST"  # the version a function's config describes; published ones never change


class _Waiter:
    __slots__ = ("instance", "key", "future")

    def __init__(self, instance: Instance, key: Key, future: asyncio.Future[Worker | None]) -> None:
        self.instance = instance
        self.key = key
        self.future = future


class WorkerPool:
    """Warm worker processes for every function, at most `max_workers` processes in all.

    Workers are pooled per instance, a function's (name, version): `$LATEST` and each published
    version ("1", "2", ...) of one name keep their own workers, warm side by side, and a call
    only ever runs on a worker of its own instance. A call takes an idle worker of its instance
    (warm) or starts one (cold); at the cap, the least recently used idle worker of another
    instance is stopped to make room, and when every worker is busy, callers wait in arrival
    order. Idle workers stop after their config's `idle_timeout_s`; `min_warm` of them stay, for
    the functions of the config (`start`/`update`: their `$LATEST`) only, never for a published
    version. Each call's stdout/stderr are captured into a memfd (kept to `log_capture_bytes`)
    that the parent reads even after killing the worker.

    An instance's settings are the FunctionConfig of its latest call (for `$LATEST`, the config's
    once `update` gave it); a worker built from other settings (new code after a deploy or a
    reload) retires once idle, while calls in flight finish on the code they started on. A
    published version never changes, so its workers live until they idle out, `retire` ends the
    version, or `update` drops the function's name from the config.
    """

    def __init__(
        self,
        max_workers: int,
        log_capture_bytes: int = 65536,
        own_children: bool = False,
        platform_env: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """`own_children`: this process starts no children but workers, so it adopts the
        orphans of their descendants (the daemon: descendants.py); a test's process does not.
        `platform_env` gives what every worker's environment starts with (see
        process.environment), asked at each start: the API's address is known only once bound."""
        self._platform_env = platform_env
        self.init_timeout_s = INIT_TIMEOUT_S
        self._max_workers = max_workers
        self._capture_bytes = log_capture_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._functions: dict[str, FunctionConfig] = {}
        # The latest settings per instance; a worker whose key is not its instance's retires.
        self._keys: dict[Instance, tuple[FunctionConfig, Key]] = {}
        self._workers: set[Worker] = set()
        self._idle: dict[Instance, list[Worker]] = {}  # oldest first; the newest is reused first
        self._counts: dict[Instance, int] = {}  # workers reserved, starting, idle or busy
        self._slots = 0  # processes counted against max_workers, from reservation until reaped
        self._dying = 0  # processes killed but not reaped yet: each frees a slot soon
        self._spawning = 0
        self._spawned: asyncio.Future[None] | None = None  # resolved when _spawning drops to 0
        self._waiters: deque[_Waiter] = deque()
        self._warm_failed: dict[Instance, Key] = {}  # code whose init failed: not kept warm
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._reaper_wake = asyncio.Event()
        self._reaper_at: float | None = None
        self.start_health = StartHealth()
        self._start_retry: asyncio.TimerHandle | None = None  # while degraded: a start of its own
        self._orphans = Orphans(own_children)
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._closed = False

    # --- public API ------------------------------------------------------------------------

    async def start(self, functions: Mapping[str, FunctionConfig]) -> None:
        """Start the idle reaper and the `min_warm` workers (returns once they are ready)."""
        self._loop = asyncio.get_running_loop()
        use_pidfd_child_watcher()
        if self._orphans.own_children and become_subreaper():
            self._schedule_sweep(_SWEEP_INTERVAL_S)
        self._reaper = self._loop.create_task(self._reap_idle(), name="pool-idle-reaper")
        await self.update(functions)

    async def update(self, functions: Mapping[str, FunctionConfig]) -> None:
        """Adopt new settings: workers of changed or removed functions retire once idle.

        `functions` holds each function's `$LATEST` settings: a changed one retires that
        instance's workers; the workers of published versions stay unless the name is gone."""
        self._functions = dict(functions)
        for fn in self._functions.values():
            self._key(fn)
        for instance in [i for i in self._keys if i[0] not in self._functions]:
            del self._keys[instance]
        for worker in list(self._workers):
            if worker.state is State.IDLE and not self._is_current(worker):
                self._kill(worker, "retired")
        self._reaper_wake.set()
        if starting := self._ensure_warm():
            await asyncio.wait(starting)

    def retire(self, name: str, version: str) -> None:
        """End a published version (deleted, or no alias or caller needs it any more): its idle
        workers stop now, busy ones once their call ends. A later call for it starts afresh."""
        if version == LATEST:
            raise ValueError(
                f"function {name!r}: $LATEST cannot be retired on its own; remove the function"
            )
        self._keys.pop((name, version), None)
        self._warm_failed.pop((name, version), None)
        for worker in list(self._idle.get((name, version), ())):
            self._kill(worker, "retired")
        self._reaper_wake.set()  # forgets the instance once its last worker is gone

    async def invoke(
        self,
        fn: FunctionConfig,
        request: InvokeRequest,
        on_start: Callable[[int, float], None] | None = None,
    ) -> Outcome:
        """Run one invocation on a worker of `fn`; handler failures come back as the Outcome."""
        if self._loop is None or self._closed:
            raise PoolClosedError("the worker pool is not running")
        key = self._key(fn)
        worker = await self._acquire(fn, key)
        cold = worker is None
        if worker is None:
            started = await self._start_worker(fn, key, request)
            if isinstance(started, Outcome):
                return started
            worker = started
            worker.state = State.BUSY
        try:
            return await self._run(worker, fn, request, on_start, cold)
        except BaseException as exc:
            if worker.held:  # interrupted mid-call: the worker's state is unknown
                cancelled = isinstance(exc, asyncio.CancelledError)
                self._kill(worker, "cancelled" if cancelled else "crashed")
                self._drop(worker)
            raise

    async def close(self) -> None:
        """Kill every worker's process group and reap them all."""
        if self._closed or self._loop is None:
            self._closed = True
            return
        self._closed = True
        if self._start_retry is not None:
            self._start_retry.cancel()
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosedError("the worker pool is closed"))
        self._waiters.clear()
        for task in [self._reaper, *self._tasks]:
            if task is not None and task.get_name() != "pool-worker-exit":
                task.cancel()
        if self._spawning:  # a process about to appear must be killed too
            self._spawned = self._loop.create_future()
            await asyncio.wait([self._spawned], timeout=_EXIT_WAIT_S)
        for worker in list(self._workers):
            self._kill(worker, "closed")
        pending = [task for task in [self._reaper, *self._tasks] if task is not None]
        if pending:
            _, late = await asyncio.wait(pending, timeout=_EXIT_WAIT_S)
            if late:
                log.error("pool_close_incomplete", unreaped=len(late))
        await self._sweep_last()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per function, all its versions together: idle workers and busy ones (serving or
        starting)."""
        stats = {name: {"idle": 0, "busy": 0} for name in self._functions}
        for worker in self._workers:
            if worker.state not in (State.STOPPING, State.EXITED):
                entry = stats.setdefault(worker.fn.name, {"idle": 0, "busy": 0})
                entry["idle" if worker.state is State.IDLE else "busy"] += 1
        return stats

    def stats_by_version(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per function, then per version with a live worker: idle workers and busy ones."""
        stats: dict[str, dict[str, dict[str, int]]] = {name: {} for name in self._functions}
        for worker in self._workers:
            if worker.state not in (State.STOPPING, State.EXITED):
                versions = stats.setdefault(worker.fn.name, {})
                entry = versions.setdefault(worker.fn.version, {"idle": 0, "busy": 0})
                entry["idle" if worker.state is State.IDLE else "busy"] += 1
        return stats

    def worker_states(self) -> dict[tuple[str, str], int]:
        """Live workers by (function, state): starting, idle or busy (for GET /metrics)."""
        counts: dict[tuple[str, str], int] = {}
        for worker in self._workers:
            if worker.state in (State.STARTING, State.IDLE, State.BUSY):
                key = (worker.fn.name, worker.state.value)
                counts[key] = counts.get(key, 0) + 1
        return counts

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def code_in_use(self) -> set[str]:
        """The code and dependency folders that live workers run from."""
        return {
            path
            for worker in self._workers
            if worker.state is not State.EXITED
            for path in (worker.fn.code, worker.fn.deps)
            if path
        }

    # --- handing out workers and slots -----------------------------------------------------

    def _key(self, fn: FunctionConfig) -> Key:
        """What a worker is built from; a worker with an outdated key retires."""
        instance = (fn.name, fn.version)
        entry = self._keys.get(instance)
        if entry is not None and entry[0] is fn:
            return entry[1]
        env = tuple(sorted(fn.env.items()))
        key: Key = (fn.code, fn.deps, fn.handler, fn.memory_mb, fn.version, fn.region, env)
        key += (fn.sandbox, fn.network, fn.tmp_mb, fn.hidden, fn.visible)
        self._keys[instance] = (fn, key)
        return key

    def _is_current(self, worker: Worker) -> bool:
        entry = self._keys.get(worker.instance)
        return entry is not None and entry[1] == worker.key

    def _settings(self, instance: Instance) -> tuple[FunctionConfig, int] | None:
        """The instance's current settings (the config's, else those of its latest call) and
        how many of its workers stay warm: min_warm is for `$LATEST`, never a published version."""
        fn = self._functions.get(instance[0])
        if fn is None or fn.version != instance[1]:
            entry = self._keys.get(instance)
            if entry is None:
                return None
            fn = entry[0]
        return fn, fn.min_warm if instance[1] == LATEST else 0

    async def _acquire(self, fn: FunctionConfig, key: Key) -> Worker | None:
        """An idle worker of `fn`, or None with a slot reserved for starting one."""
        instance = (fn.name, fn.version)
        if not self._waiters:
            if (worker := self._pop_idle(instance, key)) is not None:
                return worker
            if self._slots < self._max_workers:
                self._reserve(instance)
                return None
        assert self._loop is not None
        waiter = _Waiter(instance, key, self._loop.create_future())
        self._waiters.append(waiter)
        self._pump()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                if (granted := waiter.future.result()) is None:
                    self._unreserve(instance)
                else:
                    self._release(granted)
            raise

    def _pop_idle(self, instance: Instance, key: Key) -> Worker | None:
        idle = self._idle.get(instance)
        while idle:
            worker = idle.pop()
            worker.state = State.BUSY
            if worker.key == key and not worker.channel.closed:
                worker.held = True
                return worker
            # a corrupt frame while idle (a handler's thread wrote to the channel), or old code
            self._kill(worker, "crashed" if worker.channel.corrupt else "retired")
        return None

    def _reserve(self, instance: Instance) -> None:
        self._slots += 1
        self._counts[instance] = self._counts.get(instance, 0) + 1

    def _unreserve(self, instance: Instance) -> None:
        self._slots -= 1
        self._counts[instance] -= 1
        self._pump()

    def _pump(self) -> None:
        """Serve waiters in arrival order: an idle worker of theirs, a free slot, or an eviction."""
        credit = self._dying  # slots on their way back
        waiting: deque[_Waiter] = deque()
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.future.done():
                continue
            if (worker := self._pop_idle(waiter.instance, waiter.key)) is not None:
                waiter.future.set_result(worker)
            elif self._slots < self._max_workers:
                self._reserve(waiter.instance)
                waiter.future.set_result(None)
            else:
                waiting.append(waiter)
                if credit > 0:
                    credit -= 1
                elif (victim := self._least_recently_used()) is not None:
                    self._kill(victim, "evicted")
                else:  # every worker is busy: wait for a release
                    waiting.extend(self._waiters)
                    self._waiters.clear()
        self._waiters = waiting

    def _least_recently_used(self) -> Worker | None:
        oldest = [idle[0] for idle in self._idle.values() if idle]
        return min(oldest, key=lambda worker: worker.idle_since) if oldest else None

    def _release(self, worker: Worker) -> None:
        """A caller is done with a live worker: it becomes idle, or goes if outdated."""
        worker.held = False
        if worker.state not in (State.BUSY, State.STARTING):
            if worker.state is State.EXITED:
                worker.close_files()
            return
        if self._closed or worker.channel.closed or not self._is_current(worker):
            self._kill(worker, "closed" if self._closed else "retired")
            return
        if worker.recycle is not None:  # served its quota or grew too big: a fresh one follows
            worker.stop_detail = worker.recycle
            self._kill(worker, "recycled")
            return
        assert self._loop is not None
        worker.state = State.IDLE
        worker.idle_since = now = self._loop.time()
        self._idle.setdefault(worker.instance, []).append(worker)
        if self._waiters:
            self._pump()
            return
        fn, min_warm = self._settings(worker.instance) or (worker.fn, 0)
        if self._counts[worker.instance] > min_warm:
            if self._reaper_at is None or now + fn.idle_timeout_s < self._reaper_at:
                self._reaper_wake.set()

    def _corrupt_while_idle(self, worker: Worker) -> None:
        """Bytes that are no frame came from a worker between its calls (a handler's thread
        wrote to the channel): it is ended now, not when the next call would pick it."""
        if worker.state is State.IDLE:
            self._kill(worker, "crashed")

    def _drop(self, worker: Worker) -> None:
        """A caller is done with a worker that was killed or died."""
        worker.held = False
        if worker.state is State.EXITED:
            worker.close_files()

    def _kill(self, worker: Worker, reason: str) -> None:
        """SIGKILL the worker's process group; its slot frees once the exit is reaped."""
        if worker.state in (State.STOPPING, State.EXITED):
            return
        if worker.state is State.IDLE:
            self._idle[worker.instance].remove(worker)
        worker.state = State.STOPPING
        worker.stop_reason = reason
        self._counts[worker.instance] -= 1
        self._dying += 1
        worker.kill_tree()

    async def _watch_exit(self, worker: Worker) -> None:
        self._on_exit(worker, await worker.proc.wait())

    def _on_exit(self, worker: Worker, returncode: int) -> None:
        name = worker.fn.name
        if worker.state is State.STOPPING:
            self._dying -= 1
        else:  # it died on its own
            if worker.state is State.IDLE:
                self._idle[worker.instance].remove(worker)
            self._counts[worker.instance] -= 1
            worker.stop_reason = "crashed"
            worker.kill_group()  # whatever the handler left running (the sweep below: the rest)
        worker.state = State.EXITED
        self._slots -= 1
        self._workers.discard(worker)
        LIVE_MARKS.discard(worker.mark)  # its descendants are orphans now, for the sweep below
        WORKER_PIDS.discard(worker.pid)
        worker.channel.hang_up()
        if not worker.held:
            worker.close_files()
        exit_code, signum = exit_status(worker_returncode(worker.fn, returncode))
        emit = log.warning if worker.stop_reason == "crashed" else log.info
        emit(
            "worker_stopped",
            function=name,
            version=worker.fn.version,
            pid=worker.pid,
            reason=worker.stop_reason,
            exit_code=exit_code,
            signal=signum,
            **worker.stop_detail,
        )
        self._sweep(ended=True)  # its orphans, re-parented to this process as it exited
        if not self._closed:
            self._pump()
            self._ensure_warm()

    # --- starting workers --------------------------------------------------------------------

    def _spawn_task(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ensure_warm(self) -> list[asyncio.Task[Any]]:
        """Start workers for functions below `min_warm`, in free slots only (no eviction)."""
        starting = []
        for fn in self._functions.values():
            instance = (fn.name, fn.version)
            key = self._keys[instance][1]
            if fn.min_warm == 0 or self._warm_failed.get(instance) == key:
                continue
            while (
                self._counts.get(instance, 0) < fn.min_warm
                and self._slots < self._max_workers
                and not self._waiters
                and not self._closed
            ):
                self._reserve(instance)
                starting.append(self._spawn_task(self._warm(fn, key), "pool-warm-start"))
        return starting

    async def _warm(self, fn: FunctionConfig, key: Key) -> None:
        started = await self._start_worker(fn, key, None)
        if isinstance(started, Outcome):
            return
        try:  # module-level output goes to the daemon log only
            started.read_output(None, self._capture_bytes)
        finally:
            self._release(started)

    async def _start_worker(
        self, fn: FunctionConfig, key: Key, request: InvokeRequest | None
    ) -> Worker | Outcome:
        """Spawn a worker into a reserved slot and wait for its init; an Outcome if that fails."""
        assert self._loop is not None
        started_at, clock = time.time(), time.perf_counter()
        try:
            worker = await self._spawn(fn, key, request is not None)
        except PoolClosedError:
            raise
        except Exception as exc:  # the slot is free again (_spawn): the next call tries anew
            error_type, error = start_error(fn.name, exc)
            if error_type == WORKER_START_FAILED:
                delay_s = self.start_health.failed(fn.name, error)
                self._retry_start_in(delay_s, (fn.name, fn.version))
            else:
                log.error(
                    "worker_init_failed",
                    function=fn.name,
                    error_type=error_type,
                    error_message=error,
                )
            payload = error_payload(error_type, error)
            return call_outcome(Status.FAILED, payload, started_at, clock, error_type, error)
        message: Any
        try:
            self.start_health.succeeded()  # the process runs: whatever its init does, starts work
            async with asyncio.timeout(self.init_timeout_s):
                message = await worker.channel.receive()
        except TimeoutError:
            message = TIMED_OUT
        except BaseException:
            self._kill(worker, "cancelled")
            self._drop(worker)
            raise
        if isinstance(message, Ready):
            self._warm_failed.pop(worker.instance, None)
            worker.init_duration_ms = message.init_duration_ms
            log.info(
                "worker_started",
                function=fn.name,
                version=fn.version,
                pid=worker.pid,
                init_duration_ms=round(message.init_duration_ms, 3),
            )
            return worker
        try:
            return await self._init_failure(worker, message, request, started_at, clock)
        except BaseException:  # cancelled while it waited for the exit: do not wait for it
            self._kill(worker, "cancelled")
            raise
        finally:
            self._drop(worker)

    async def _spawn(self, fn: FunctionConfig, key: Key, on_demand: bool) -> Worker:
        """The started worker in the reserved slot; on any failure before the process exists,
        the slot and every descriptor taken so far are given back before the exception goes on
        (each of these steps fails with EMFILE when descriptors run out)."""
        assert self._loop is not None and fn.code is not None
        with contextlib.ExitStack() as undo:
            undo.callback(self._unreserve, (fn.name, fn.version))
            if self._closed:
                raise PoolClosedError("the worker pool is closed")
            parent_sock, child_sock = socket.socketpair()
            undo.callback(parent_sock.close)
            runtime_api = None
            if serves_runtime_api(fn):
                runtime_api = RuntimeChannel(
                    self._loop, fn.timeout_s, fn.memory_mb, bootstrap_path(fn)
                )
                undo.callback(runtime_api.hang_up)
                await runtime_api.listen()
            stream = new_log_stream(fn)
            LIVE_MARKS.add(stream)  # from before the fork: its orphans are never anyone's
            undo.callback(LIVE_MARKS.discard, stream)
            with child_sock:  # the child's end: open in the child only, once it is started
                memfd = capture_file(fn.name)
                undo.callback(os.close, memfd)
                address = runtime_api.address if runtime_api is not None else None
                proc = await self._start_process(fn, child_sock, memfd, on_demand, stream, address)
            undo.pop_all()  # the process holds the slot now; its exit gives it back
        worker = Worker(fn, key, proc, memfd, self._loop, stream, runtime_api)
        WORKER_PIDS.add(worker.pid)
        worker.channel.on_corrupt = lambda: self._corrupt_while_idle(worker)
        self._workers.add(worker)
        worker.exit_task = self._spawn_task(self._watch_exit(worker), "pool-worker-exit")
        if runtime_api is not None:  # the bootstrap's channel is its Runtime API
            parent_sock.close()
            return worker
        try:
            # The channel is a duck-typed asyncio.Protocol (protocol.py must not import asyncio).
            channel = cast(asyncio.Protocol, worker.channel)
            await self._loop.create_unix_connection(lambda: channel, sock=parent_sock)
        except BaseException:
            parent_sock.close()
            self._kill(worker, "cancelled")
            self._drop(worker)
            raise
        return worker

    async def _start_process(
        self,
        fn: FunctionConfig,
        child_sock: socket.socket,
        memfd: int,
        on_demand: bool,
        stream: str,
        runtime_api: str | None,
    ) -> asyncio.subprocess.Process:
        self._spawning += 1
        try:
            platform = self._platform_env() if self._platform_env is not None else None
            return await start_process(
                fn, child_sock, memfd, on_demand, stream, platform, runtime_api
            )
        finally:
            self._spawning -= 1
            if not self._spawning and self._spawned is not None and not self._spawned.done():
                self._spawned.set_result(None)

    def _retry_start_in(self, delay_s: float, instance: Instance) -> None:
        """While starts fail, try one of `instance`'s after `delay_s`, even when no call needs
        it."""
        if self._start_retry is None and not self._closed:
            assert self._loop is not None
            self._start_retry = self._loop.call_later(delay_s, self._retry_start, instance)

    def _retry_start(self, instance: Instance) -> None:
        self._start_retry = None
        settings = self._settings(instance)
        fn = settings[0] if settings else next(iter(self._functions.values()), None)
        if self._closed or not self.start_health.degraded or fn is None:
            return
        if self._slots >= self._max_workers or self._waiters:  # calls will try starts anyway
            self._retry_start_in(self.start_health.retry_delay_s(), instance)
            return
        # A warm start: the worker it brings up serves the next call, or idles out.
        self._reserve((fn.name, fn.version))
        self._spawn_task(self._warm(fn, self._key(fn)), "pool-retry-start")

    async def _init_failure(
        self,
        worker: Worker,
        message: Any,
        request: InvokeRequest | None,
        started_at: float,
        clock: float,
    ) -> Outcome:
        request_id = request.invocation_id if request else ""
        # min_warm stops restarting this code until it changes or a cold start gets through.
        self._warm_failed[worker.instance] = worker.key
        if isinstance(message, InitFailed):
            self._kill(worker, "init_failed")
            await worker.wait_exit(_EXIT_WAIT_S)
            outcome = call_outcome(
                Status.FAILED,
                message.payload,
                started_at,
                clock,
                message.error_type,
                message.error_message,
            )
            outcome.init_duration_ms = message.init_duration_ms
        else:
            outcome = await self._lost(
                worker, message, request_id, "Init", self.init_timeout_s, started_at, clock
            )
        outcome.logs = worker.read_output(request_id or None, self._capture_bytes)
        outcome.worker_pid = worker.pid
        log.warning(
            "worker_init_failed",
            function=worker.fn.name,
            pid=worker.pid,
            error_type=outcome.error_type,
            error_message=outcome.error_message,
        )
        return outcome

    # --- one invocation ----------------------------------------------------------------------

    async def _run(
        self,
        worker: Worker,
        fn: FunctionConfig,
        request: InvokeRequest,
        on_start: Callable[[int, float], None] | None,
        cold: bool,
    ) -> Outcome:
        loop = self._loop
        assert loop is not None
        started_at = time.time()
        if on_start is not None:
            try:
                on_start(worker.pid, started_at)
            except BaseException:
                self._release(worker)
                raise
        clock = time.perf_counter()
        invoke = Invoke(
            request.invocation_id,
            request.event,
            request.invoked_arn,
            int((started_at + fn.timeout_s) * 1000),
            request.client_context,
        )
        message = await worker.call(loop, invoke, fn.timeout_s, self._capture_bytes, self._time_out)
        if isinstance(message, Result):
            outcome = call_outcome(
                Status.SUCCEEDED if message.ok else Status.FAILED,
                message.payload,
                started_at,
                clock,
                message.error_type,
                message.error_message,
            )
            outcome.max_memory_mb = kb_to_mb(message.max_memory_kb)
            if len(message.payload) > BIG_PAYLOAD_BYTES:
                trim_soon(loop)
            if message.retire:  # it exits after this reply: out of memory, or broken state
                if message.error_type == "Runtime.OutOfMemory":
                    self._kill(worker, "out_of_memory")
                else:
                    worker.stop_detail = {"why": "handler_state"}
                    self._kill(worker, "recycled")
            else:
                worker.check_recycle(fn, message.rss_kb)
        else:
            outcome = await self._lost(
                worker, message, request.invocation_id, "Task", fn.timeout_s, started_at, clock
            )
        if not (isinstance(message, Result) and message.quiet):  # quiet: nothing to read
            outcome.logs = worker.read_output(request.invocation_id, self._capture_bytes)
        outcome.worker_pid = worker.pid
        outcome.init_duration_ms = worker.init_duration_ms if cold else None
        self._release(worker)
        return outcome

    async def _lost(
        self,
        worker: Worker,
        message: Any,
        request_id: str,
        phase: str,
        timeout_s: float,
        started_at: float,
        clock: float,
    ) -> Outcome:
        """The Outcome when no reply came: the deadline passed, or the worker died."""
        if message is TIMED_OUT:
            self._time_out(worker)
            await worker.wait_exit(_EXIT_WAIT_S)
            return timed_out(request_id, phase, timeout_s, started_at, worker.peak_kb)
        # A corrupt frame: the worker no longer speaks the protocol, and may never exit by
        # itself. An orderly EOF: it is exiting, and its exit status tells how.
        if worker.channel.corrupt or not await worker.wait_exit(_CRASH_GRACE_S):
            self._kill(worker, "crashed")  # it closed the channel but lives on: no use to anyone
            await worker.wait_exit(_EXIT_WAIT_S)
        return crashed(
            request_id, worker_returncode(worker.fn, worker.proc.returncode), started_at, clock
        )

    def _time_out(self, worker: Worker) -> None:
        if worker.state not in (State.STOPPING, State.EXITED):
            worker.peak_kb = peak_memory_kb(worker.main_pid())  # readable only before the kill
            self._kill(worker, "timeout")

    # --- orphans ------------------------------------------------------------------------------

    def _sweep(self, ended: bool = False) -> None:
        """Kill the orphans of workers that are gone and reap those that exited (descendants.py).

        `ended`: a worker has just exited, so unmarked orphans (if this process owns its
        children) are killed too. After a kill, the next sweep comes soon to reap them.
        """
        if self._sweep_timer is not None:  # called directly, or this is the timer: one chain
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if self._spawning:  # a child between fork and exec carries no mark yet: not now
            self._schedule_sweep(_SWEEP_AGAIN_S)
            return
        killed = self._orphans.sweep(kill_unmarked=ended or self._closed)
        if killed:
            self._schedule_sweep(_SWEEP_AGAIN_S)
        elif self._orphans.own_children and not self._closed:
            self._schedule_sweep(_SWEEP_INTERVAL_S)

    def _schedule_sweep(self, delay_s: float) -> None:
        assert self._loop is not None
        when = self._loop.time() + delay_s
        if self._sweep_timer is not None:
            if self._sweep_timer.when() <= when:
                return
            self._sweep_timer.cancel()
        self._sweep_timer = self._loop.call_at(when, self._sweep)

    async def _sweep_last(self) -> None:
        """At close, every worker reaped: kill their orphans, and reap them (bounded)."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for _ in range(int(_EXIT_WAIT_S / _SWEEP_AGAIN_S)):
            killed = self._orphans.sweep(kill_unmarked=True)
            if not killed and not self._orphans.pending:
                return
            await asyncio.sleep(_SWEEP_AGAIN_S)  # killed processes exit within moments

    # --- idle workers --------------------------------------------------------------------------

    async def _reap_idle(self) -> None:
        """Stop idle workers past their function's idle_timeout_s, oldest first, above min_warm."""
        while True:
            self._reaper_wake.clear()
            self._reaper_at = self._stop_expired()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._reaper_at):
                    await self._reaper_wake.wait()

    def _stop_expired(self) -> float | None:
        """Stop what has expired; the time by which anything else could expire, if anything."""
        assert self._loop is not None
        now, next_at = self._loop.time(), None
        for instance, count in list(self._counts.items()):
            settings = self._settings(instance)
            if settings is None:  # retired or removed: forgotten once its last worker is gone
                if count == 0:
                    del self._counts[instance]
                    self._idle.pop(instance, None)
                continue
            fn, min_warm = settings
            if count <= min_warm:
                continue
            spare = count - min_warm
            # Busy workers released from now on expire no earlier than this; sleeping until then
            # spares waking the reaper on every release.
            earliest = now + fn.idle_timeout_s
            for worker in list(self._idle.get(instance, ())):
                if worker.idle_since + fn.idle_timeout_s > now:
                    earliest = worker.idle_since + fn.idle_timeout_s
                    break
                self._kill(worker, "idle")
                spare -= 1
                if spare == 0:
                    break
            if spare > 0:
                next_at = earliest if next_at is None else min(next_at, earliest)
        return next_at
