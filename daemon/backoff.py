"""Capped exponential backoff, the one schedule every retry loop of the daemon waits on.

The delay after `n` failures is `first_s * 2**n`, at most `cap_s`, scaled by a random factor
drawn from `jitter` (a `(low, high)` range; `(1.0, 1.0)` for none) and still at most `cap_s`.
Reconnecting clients use `(0.5, 1.0)`: they spread out yet never wait past the schedule.
Channels and retries use `(1.0, 1.5)`: jitter only lengthens, so `first_s` stays a floor.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_MAX_DOUBLINGS = 64  # far past every cap, and 2.0**n would overflow for large n


class Backoff:
    """A doubling delay, capped and jittered. `next()` counts failures; `reset()` forgets them.

    `delay_s(failures)` is the same schedule as a pure function, for a caller that keeps the
    count itself (per channel, per invocation). `rand` is the random source, injected by tests.
    """

    def __init__(
        self,
        first_s: float,
        cap_s: float,
        *,
        jitter: tuple[float, float] = (1.0, 1.0),
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.jitter = jitter
        self.failures = 0
        self._rand = rand

    def delay_s(self, failures: int) -> float:
        """The delay after `failures` failures in a row (0: the first delay)."""
        nominal = min(self.cap_s, self.first_s * 2.0 ** min(failures, _MAX_DOUBLINGS))
        low, high = self.jitter
        if low == high == 1.0:
            return nominal
        return min(self.cap_s, nominal * (low + (high - low) * self._rand()))

    def next(self) -> float:
        """The delay before the next try, counting one more failure."""
        delay = self.delay_s(self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """Things work again: the next delay is the first one."""
        self.failures = 0
