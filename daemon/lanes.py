"""A function's lane: its concurrency slots, waiting synchronous callers, async backlog and retries.

At most `concurrency` invocations of a function run at once. Synchronous callers wait in a
bounded FIFO (rejected when it is full); accepted asynchronous invocations wait in the backlog
(they are already durable, so that wait is unbounded); retries wait on timers until they are
due and then join the backlog. The events of waiting invocations are kept in memory up to
EventBudget's bytes, across all lanes; past it (and on retry timers) a waiting invocation keeps
only its id, and its event is read back from the store when it starts: a burst of large events
costs disk, not memory. Synchronous callers go first when a slot frees up: someone is
holding a connection open. The lane decides *when* something runs; the dispatcher, through
`start`, decides what running it means.

A trigger with `batch_size` > 1 gathers its invocations apart from the backlog, in arrival
order: a batch is ready once it holds `batch_size` of them, or once `batch_window_s` has passed
since the oldest one arrived, and then takes one slot (`start_batch`) for up to `batch_size`
items bound to one version. When both wait, ready batches and the backlog take turns.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from daemon.config import FunctionConfig
from daemon.errors import QueueFullError, ShuttingDownError
from daemon.metrics import FunctionCounts

MAX_WAITING_EVENT_BYTES = 16 * 1024 * 1024  # events of waiting invocations held in memory


class Backlogged(msgspec.Struct, frozen=True):
    """An accepted async invocation waiting for its next attempt."""

    id: str
    event: bytes | None  # None: in the store only, read when the attempt starts
    attempt: int  # attempts made so far
    trigger: str
    retry_base: int  # the retry budget counts attempts after this one
    age_from: float  # the event's age counts from here
    version: str = "$LATEST"  # what the invocation was bound to when accepted (daemon/versions.py)
    trigger_id: str | None = None  # `NAME#i`; a batched trigger's invocations run in batches


@dataclass
class _Gathering:
    """The waiting invocations of one batched trigger, with the loop time each arrived."""

    size: int
    window_s: float
    items: deque[tuple[float, Backlogged]] = field(default_factory=deque)
    timer: asyncio.TimerHandle | None = None  # wakes the lane when the window ends

    def ready(self, now: float) -> bool:
        return len(self.items) >= self.size or now - self.items[0][0] >= self.window_s

    def take(self) -> list[Backlogged]:
        """Up to `size` items from the oldest, all bound to the oldest one's version."""
        version = self.items[0][1].version
        taken: list[Backlogged] = []
        while self.items and len(taken) < self.size and self.items[0][1].version == version:
            taken.append(self.items.popleft()[1])
        # In the order the events were accepted: retries (recovered ones each on a jittered
        # timer of their own) come back in any order.
        taken.sort(key=lambda item: (item.age_from, item.id))
        return taken


class EventBudget:
    """The bytes of waiting events the lanes keep in memory, shared by all of them."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = MAX_WAITING_EVENT_BYTES if max_bytes is None else max_bytes
        self.held = 0

    def hold(self, item: Backlogged) -> Backlogged:
        """`item`, or `item` without its event when the budget has no room for it."""
        if item.event is None:
            return item
        if self.held + len(item.event) > self.max_bytes:
            return msgspec.structs.replace(item, event=None)
        self.held += len(item.event)
        return item

    def release(self, item: Backlogged) -> None:
        if item.event is not None:
            self.held -= len(item.event)


class Lane:
    """One function's slots and queues; `start(lane, item)` must take the slot it is given."""

    def __init__(
        self,
        fn: FunctionConfig,
        start: Callable[[Lane, Backlogged], None],
        loop: asyncio.AbstractEventLoop,
        budget: EventBudget | None = None,
        start_batch: Callable[[Lane, list[Backlogged]], None] | None = None,
    ) -> None:
        self.gathering: dict[str, _Gathering] = {}  # by trigger id: batched triggers only
        self._batch_turn = False  # whether a ready batch goes before the backlog next time
        self._start_batch = start_batch
        self.fn = fn
        self.budget = budget or EventBudget()
        self.loop = loop
        self.running = 0
        self.paused = False  # set while draining, or once a reload removed the function
        self.refusal: Exception = ShuttingDownError("the daemon is shutting down")
        self.sync_waiters: deque[asyncio.Future[None]] = deque()
        self.backlog: deque[Backlogged] = deque()
        self.retry_timers: dict[str, asyncio.TimerHandle] = {}  # by invocation id
        self.counts = FunctionCounts()  # for GET /metrics; kept across reloads with the lane
        # Backlog items whose `running` mark the dispatcher wrote ahead of their start, by id:
        # (the mark's write, its started_at, the attempt). See Dispatcher._mark_ahead.
        self.marked_ahead: dict[str, tuple[asyncio.Future[None], float, int]] = {}
        self.recent_ms = 0.0  # moving average of its attempts' durations
        self._start = start

    @property
    def fn(self) -> FunctionConfig:
        return self._fn

    @fn.setter
    def fn(self, fn: FunctionConfig) -> None:
        """New settings; a trigger no longer batched hands what it gathered to the backlog."""
        self._fn = fn
        batching = {
            f"{fn.name}#{i}": (getattr(t, "batch_size", 1), getattr(t, "batch_window_s", 0.0))
            for i, t in enumerate(fn.triggers)
            if getattr(t, "batch_size", 1) > 1
        }
        for trigger_id in list(self.gathering):
            gathering = self.gathering[trigger_id]
            if trigger_id not in batching:
                del self.gathering[trigger_id]
                if gathering.timer is not None:
                    gathering.timer.cancel()
                self.backlog.extend(item for _, item in gathering.items)
            else:
                gathering.size, gathering.window_s = batching[trigger_id]
        for trigger_id, (size, window_s) in batching.items():
            if trigger_id not in self.gathering:
                self.gathering[trigger_id] = _Gathering(size, window_s)

    def stats(self) -> dict[str, int]:
        return {
            "running": self.running,
            "waiting": len(self.sync_waiters),
            "backlog": len(self.backlog) + sum(len(g.items) for g in self.gathering.values()),
            "retrying": len(self.retry_timers),
        }

    async def acquire_sync_slot(self) -> None:
        """Take a slot for a synchronous caller, waiting in line; QueueFullError if it is full.

        A paused lane refuses with the error it was paused with (ShuttingDownError, or
        UnknownFunctionError for a function a reload removed).
        """
        if self.paused:
            raise self.refusal
        if self.running < self.fn.concurrency and not self.sync_waiters:
            self.running += 1
            return
        if len(self.sync_waiters) >= self.fn.queue_size:
            self.counts.throttles += 1
            raise QueueFullError(self.fn.name, self.fn.queue_size)
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.sync_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # the slot was granted as we were cancelled: give it back
            elif waiter in self.sync_waiters:  # a refused waiter is already out of the line
                self.sync_waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.running -= 1
        self.pump()

    def push(self, item: Backlogged) -> None:
        """Queue `item` to run when a slot is free."""
        self._add(item)
        self.pump()

    def _add(self, item: Backlogged) -> None:
        gathering = self.gathering.get(item.trigger_id or "") if self.gathering else None
        if gathering is None:
            self.backlog.append(self.budget.hold(item))
        else:
            gathering.items.append((self.loop.time(), self.budget.hold(item)))

    def push_at(self, item: Backlogged, at: float) -> None:
        """Queue `item` at epoch time `at`: a timer, not a polling loop."""
        if self.paused:
            return  # shutting down: the row is queued in the store and the next start resumes it
        delay_s = max(0.0, at - time.time())
        item = msgspec.structs.replace(item, event=None)  # may wait hours: read again when due
        self.retry_timers[item.id] = self.loop.call_later(delay_s, self._due, item)

    def _due(self, item: Backlogged) -> None:
        self.retry_timers.pop(item.id, None)
        self.push(item)

    def push_all_at(self, items: list[Backlogged], at: float) -> None:
        """push_at for items that come due together (a batch's failed items): one timer, so
        they arrive together and are retried as one smaller batch."""
        if self.paused or not items:
            return
        delay_s = max(0.0, at - time.time())
        items = [msgspec.structs.replace(item, event=None) for item in items]
        timer = self.loop.call_later(delay_s, self._all_due, items)
        for item in items:
            self.retry_timers[item.id] = timer

    def _all_due(self, items: list[Backlogged]) -> None:
        for item in items:
            self.retry_timers.pop(item.id, None)
            self._add(item)
        self.pump()

    def pump(self) -> None:
        """Hand free slots to waiting callers first, then to the async backlog."""
        if self.paused:
            return
        while self.running < self.fn.concurrency:
            if self.sync_waiters:
                waiter = self.sync_waiters.popleft()
                if waiter.done():
                    continue
                self.running += 1
                waiter.set_result(None)
            elif self.gathering and (batch := self._ready_batch()) is not None:
                self.running += 1
                assert self._start_batch is not None
                self._start_batch(self, batch)
            elif self.backlog:
                self._batch_turn = True
                item = self.backlog.popleft()
                self.budget.release(item)
                self.running += 1
                self._start(self, item)
            else:
                if self.gathering:
                    self._arm_windows()
                return

    def _ready_batch(self) -> list[Backlogged] | None:
        """The ready batch whose oldest item waited longest, on its turn; else None."""
        if self.backlog and not self._batch_turn:
            return None
        now = self.loop.time()
        ready = [g for g in self.gathering.values() if g.items and g.ready(now)]
        if not ready:
            return None
        self._batch_turn = False
        gathering = min(ready, key=lambda g: g.items[0][0])
        batch = gathering.take()
        for item in batch:
            self.budget.release(item)
        if gathering.timer is not None and not gathering.items:
            gathering.timer.cancel()
            gathering.timer = None
        return batch

    def _arm_windows(self) -> None:
        # A slot is free and a batch is still filling: wake up when its window ends.
        for gathering in self.gathering.values():
            if gathering.items and gathering.timer is None:
                at = gathering.items[0][0] + gathering.window_s
                gathering.timer = self.loop.call_at(at, self._window_ended, gathering)

    def _window_ended(self, gathering: _Gathering) -> None:
        gathering.timer = None
        self.pump()

    def pause(self, refusal: Exception) -> None:
        """Start nothing new; forget the backlog and retry timers (their rows stay queued;
        marks written ahead stay in `marked_ahead` for the dispatcher to take back).

        Synchronous callers still waiting are refused with `refusal`: they never started.
        """
        self.paused, self.refusal = True, refusal
        for item in self.backlog:
            self.budget.release(item)
        self.backlog.clear()
        for gathering in self.gathering.values():
            for _, item in gathering.items:
                self.budget.release(item)
            gathering.items.clear()
            if gathering.timer is not None:
                gathering.timer.cancel()
                gathering.timer = None
        for timer in self.retry_timers.values():
            timer.cancel()
        self.retry_timers.clear()
        while self.sync_waiters:
            waiter = self.sync_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(refusal)

    def resume(self) -> None:
        """Start again after a pause (a reload brought the function back)."""
        self.paused = False
        self.pump()

    def holding(self) -> set[str]:
        """Ids of the invocations waiting here: in the backlog or on a retry timer."""
        gathered = {item.id for g in self.gathering.values() for _, item in g.items}
        return {item.id for item in self.backlog} | gathered | set(self.retry_timers)


class Lanes(dict[str, Lane]):
    """Every configured function's lane by name, and the retired lanes of removed functions.

    A retired lane is kept, paused: its running invocations still release their slots and
    settle into it, and a reload that brings the function back reopens it.
    """

    def __init__(
        self,
        functions: Mapping[str, FunctionConfig],
        start: Callable[[Lane, Backlogged], None],
        loop: asyncio.AbstractEventLoop,
        start_batch: Callable[[Lane, list[Backlogged]], None] | None = None,
    ) -> None:
        self.budget = EventBudget()
        super().__init__(
            (name, Lane(fn, start, loop, self.budget, start_batch))
            for name, fn in functions.items()
        )
        self.retired: dict[str, Lane] = {}
        self._start, self._loop, self._start_batch = start, loop, start_batch

    def reconfigure(
        self, functions: Mapping[str, FunctionConfig], refusal: Callable[[str], Exception]
    ) -> list[str]:
        """Adopt new settings in place; retire removed functions (refused with `refusal(name)`).

        Returns the names of the lanes opened (new functions, or returning ones).
        """
        for name in [name for name in self if name not in functions]:
            self.retired[name] = lane = self.pop(name)
            lane.pause(refusal(name))
        opened = []
        for name, fn in functions.items():
            if name not in self:
                reopened = self.retired.pop(name, None)
                self[name] = reopened or Lane(
                    fn, self._start, self._loop, self.budget, self._start_batch
                )
                opened.append(name)
            self[name].fn = fn
            self[name].resume()  # also starts what a raised concurrency allows now
        return opened

    def pause(self, refusal: Exception) -> None:
        """Pause every lane, retired ones too."""
        for lane in [*self.values(), *self.retired.values()]:
            lane.pause(refusal)

    def holding(self, names: Iterable[str]) -> set[str]:
        """Ids waiting in the named lanes."""
        return set().union(*(self[name].holding() for name in names))
