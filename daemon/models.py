"""Plain data shared by the store, the pool and the dispatcher."""

from __future__ import annotations

import enum
import math
import os
import threading
import time

import msgspec


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CRASHED = "crashed"


FINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CRASHED})


_RANDOM_POOL_BYTES = 4000
_random_pool, _random_at = b"", 0
_random_lock = threading.Lock()  # the store's thread makes ids too (destination children)


def _random_bytes(n: int) -> bytes:
    """`n` bytes from the OS's CSPRNG, read 4 KB at a time rather than a syscall per id."""
    global _random_pool, _random_at
    with _random_lock:
        if _random_at + n > len(_random_pool):
            _random_pool, _random_at = os.urandom(_RANDOM_POOL_BYTES), 0
        start = _random_at
        _random_at += n
        return _random_pool[start : start + n]


def _forget_random_pool() -> None:
    global _random_pool, _random_at
    _random_pool, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random_pool)  # a forked child must not repeat ids


def new_id() -> str:
    """A time-ordered (version 7) UUID as text: 48 bits of Unix milliseconds, then random bits.

    Invocation ids are the primary key of `invocations` and `attempts`: ids that grow with time
    land on the right-most index page instead of a random one, which nearly halves the SQLite
    thread's work per recorded invocation. They keep the 8-4-4-4-12 form Lambda's request ids
    have; within one millisecond their order is random.
    """
    h = f"{int(time.time() * 1000) & 0xFFFFFFFFFFFF:012x}{_random_bytes(10).hex()}"
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


class InvokeRequest(msgspec.Struct, frozen=True):
    """One attempt of one invocation, as handed to the pool."""

    invocation_id: str
    event: bytes  # the event as JSON text
    invoked_arn: str
    client_context: str | None = None  # base64 JSON, sync Invoke API calls only


class Outcome(msgspec.Struct):
    """What one attempt came to; the pool fills it, the store records it."""

    status: Status
    payload: bytes  # result JSON on success, Lambda's error JSON otherwise
    started_at: float  # epoch seconds
    ended_at: float
    duration_ms: float
    error_type: str | None = None
    error_message: str | None = None
    init_duration_ms: float | None = None  # set on a cold start only
    max_memory_mb: float | None = None
    logs: str = ""
    worker_pid: int | None = None
    exit_code: int | None = None  # crashed: the worker's exit status ...
    signal: int | None = None  # ... or the signal that killed it

    @property
    def billed_duration_ms(self) -> int:
        return max(1, math.ceil(self.duration_ms))
