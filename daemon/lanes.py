"""A function's lane: its concurrency slots, waiting synchronous callers, async backlog and retries.

At most `concurrency` invocations of a function run at once. Synchronous callers wait in a
bounded FIFO (rejected when it is full); accepted asynchronous invocations wait in the backlog
(they are already durable, so that wait is unbounded); retries wait on timers until they are
due and then join the backlog. Synchronous callers go first when a slot frees up: someone is
holding a connection open. The lane decides *when* something runs; the dispatcher, through
`start`, decides what running it means.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import msgspec

from daemon.config import FunctionConfig
from daemon.errors import QueueFullError


class Backlogged(msgspec.Struct, frozen=True):
    """An accepted async invocation waiting for its next attempt."""

    id: str
    event: bytes
    attempt: int  # attempts made so far
    trigger: str
    retry_base: int  # the retry budget counts attempts after this one
    age_from: float  # the event's age counts from here


class Lane:
    """One function's slots and queues; `start(lane, item)` must take the slot it is given."""

    def __init__(self, fn: FunctionConfig, start: Callable[[Lane, Backlogged], None]) -> None:
        self.fn = fn
        self.running = 0
        self.paused = False  # set while draining: nothing new starts
        self.sync_waiters: deque[asyncio.Future[None]] = deque()
        self.backlog: deque[Backlogged] = deque()
        self.retry_timers: dict[str, asyncio.TimerHandle] = {}  # by invocation id
        self._start = start

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "waiting": len(self.sync_waiters),
                "backlog": len(self.backlog), "retrying": len(self.retry_timers)}  # fmt: skip

    async def acquire_sync_slot(self) -> None:
        """Take a slot for a synchronous caller, waiting in line; QueueFullError if it is full."""
        if self.running < self.fn.concurrency and not self.sync_waiters and not self.paused:
            self.running += 1
            return
        if len(self.sync_waiters) >= self.fn.queue_size:
            raise QueueFullError(self.fn.name, self.fn.queue_size)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sync_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was granted as we were cancelled: give it back
            else:
                self.sync_waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.running -= 1
        self.pump()

    def push(self, item: Backlogged) -> None:
        """Queue `item` to run when a slot is free."""
        self.backlog.append(item)
        self.pump()

    def push_at(self, item: Backlogged, at: float) -> None:
        """Queue `item` at epoch time `at`: a timer, not a polling loop."""
        if self.paused:
            return  # shutting down: the row is queued in the store and the next start resumes it
        delay_s = max(0.0, at - time.time())
        self.retry_timers[item.id] = asyncio.get_running_loop().call_later(delay_s, self._due, item)

    def _due(self, item: Backlogged) -> None:
        self.retry_timers.pop(item.id, None)
        self.push(item)

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
            elif self.backlog:
                item = self.backlog.popleft()
                self.running += 1
                self._start(self, item)
            else:
                return

    def pause(self) -> None:
        """Start nothing new; forget the backlog and retry timers (their rows stay queued)."""
        self.paused = True
        self.backlog.clear()
        for timer in self.retry_timers.values():
            timer.cancel()
        self.retry_timers.clear()
