"""The daemon's heap after big buffers: glibc's malloc, told to give them back to the kernel.

A result near Lambda's 6 MB limit passes through the daemon in several copies (the channel's
buffer, the frame, the payload, the store's row, the HTTP answer). glibc serves a request that
large with mmap and unmaps it when freed, but each such free also raises its mmap threshold (up
to 32 MB), after which the next buffers of that size come from the heap, whose free pages are
kept. A daemon that answered a few big results held on to about 90 MB of them for good
(benchmarks/bigresult.py: 46 MB idle, 139 MB after twenty 6 MB results).

`keep_heap_small()` fixes the threshold at 512 KiB (setting it turns glibc's adjustment off):
every buffer above it is its own mapping, returned when freed. Smaller ones are unaffected, and
512 KiB is above the 256 KiB reads of the event loop's transports, which keep coming from the
heap as before. Off glibc (musl, other systems) it does nothing.

It also caps glibc's arenas at ARENAS, which keeps an idle daemon smaller.

`trim_soon()`, after a result over BIG_PAYLOAD_BYTES, returns what is left free in the heaps.

These rely on glibc's documented `mallopt(M_MMAP_THRESHOLD)` and `malloc_trim`
(docs/performance.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os

M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 512 * 1024
# The event loop's thread uses the main arena; every other thread (SQLite's, the executor's)
# shares one more. glibc's default (8 per core) gives each thread an arena of its own, whose
# pages stay mapped: 0.3 to 0.5 MB of an idle daemon's RSS here.
ARENAS = 2


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The running C library when it is glibc, else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):  # the name is unknown off glibc
        return None
    return ctypes.CDLL(None)


def keep_heap_small() -> bool:
    """Fix glibc's mmap threshold (see the module doc); whether it was set."""
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt(M_ARENA_MAX, ARENAS)  # before any thread starts (see ARENAS)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


# A result this big makes the daemon trim its heap soon after (`trim_soon`).
BIG_PAYLOAD_BYTES = 1024 * 1024
TRIM_DELAY_S = 1.0
_trim_pending: list[asyncio.TimerHandle] = []


def trim_soon(loop: asyncio.AbstractEventLoop) -> None:
    """Trim the heap TRIM_DELAY_S from now, once however many big results arrive meanwhile.

    The threshold above keeps each big buffer out of the heap, but what a big result leaves
    behind in smaller pieces (the SQLite thread's copy of the row, say, in that thread's own
    malloc arena) stays in the heaps' free lists: malloc_trim(0) hands those pages back, in
    every arena. Delayed, so that it runs once the result has been answered and stored.
    """
    if _trim_pending or glibc() is None:
        return
    _trim_pending.append(loop.call_later(TRIM_DELAY_S, _trim))


def _trim() -> None:
    _trim_pending.clear()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
