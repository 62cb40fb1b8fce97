"""One run per synchronous Invoke API call, however often botocore re-sends it.

botocore re-sends an invoke that hit its read timeout with the same `amz-sdk-invocation-id`
header. A repeat that arrives while the first call runs waits for it; one that arrives within
`ttl_s` after gets the cached answer. Either way it carries the same request id and no second
invocation is recorded. The cache is bounded in entries and in bytes, since a sync result may be
6 MB and the board has little memory; an evicted key simply runs again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial

from daemon.models import Outcome

Result = tuple[str, Outcome]  # (invocation id, outcome)


class SyncResultCache:
    """In-flight and recent synchronous results by (function, SDK invocation id, body hash)."""

    def __init__(
        self, ttl_s: float = 600.0, max_entries: int = 1000, max_bytes: int = 16 * 1024 * 1024
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._running: dict[tuple[str, str, bytes], asyncio.Task[Result]] = {}
        self._done: OrderedDict[tuple[str, str, bytes], tuple[float, Result, int]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(function: str, sdk_invocation_id: str, body: bytes) -> tuple[str, str, bytes]:
        # The body is part of the key: a client reusing an id for another request gets a run
        # of its own rather than somebody else's answer.
        return function, sdk_invocation_id, hashlib.blake2b(body, digest_size=16).digest()

    async def run(
        self, key: tuple[str, str, bytes], call: Callable[[], Awaitable[Result]]
    ) -> tuple[Result, bool]:
        """`call()` once per key; returns (its result, whether this caller was a repeat).

        Exceptions (a full queue) are passed to every waiter and not cached.
        """
        self._expire(time.monotonic())
        cached = self._done.get(key)
        if cached is not None:
            return cached[1], True
        task = self._running.get(key)
        repeat = task is not None
        if task is None:
            # A task of its own: the first caller hanging up must not cancel the run its
            # repeats are waiting for.
            task = asyncio.ensure_future(call())
            self._running[key] = task
            task.add_done_callback(partial(self._settled, key))
        return await asyncio.shield(task), repeat

    def __len__(self) -> int:
        return len(self._done)

    def _settled(self, key: tuple[str, str, bytes], task: asyncio.Task[Result]) -> None:
        self._running.pop(key, None)
        if task.cancelled() or task.exception() is not None:  # also marks it retrieved
            return
        result = task.result()
        size = len(result[1].payload) + len(result[1].logs)
        if size > self.max_bytes:
            return
        self._done[key] = (time.monotonic() + self.ttl_s, result, size)
        self._bytes += size
        while len(self._done) > self.max_entries or self._bytes > self.max_bytes:
            self._drop_oldest()

    def _expire(self, now: float) -> None:
        while self._done and next(iter(self._done.values()))[0] <= now:
            self._drop_oldest()  # insertion order is expiry order: one TTL for all

    def _drop_oldest(self) -> None:
        _, (_, _, size) = self._done.popitem(last=False)
        self._bytes -= size
