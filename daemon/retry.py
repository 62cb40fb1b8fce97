"""The async retry policy: what happens to an invocation after an attempt that did not succeed.

Pure functions of the function's settings and the clock, so the dispatcher (after an attempt)
and the store (recovering attempts a crash interrupted, in its database thread) decide alike.

The budget counts from `retry_base` (the attempt number a redrive started from; 0 otherwise)
and the age from `age_from` (the redrive time, else the time the event was accepted).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from daemon.backoff import Backoff
from daemon.config import FunctionConfig

RETRIES_EXHAUSTED = "RetriesExhausted"
EVENT_AGE_EXCEEDED = "EventAgeExceeded"


class Verdict(msgspec.Struct, frozen=True):
    """Retry at `next_attempt_at`, or dead-letter for `dead_letter`; exactly one is set."""

    next_attempt_at: float | None = None
    dead_letter: str | None = None


def backoff_s(fn: FunctionConfig, retry: int, rand: Callable[[], float] = random.random) -> float:
    """The delay before retry number `retry` (1 = the first): doubling from the first delay.

    Jitter only lengthens it, by up to half, so events that failed together (a broker outage)
    spread out, yet the configured first delay stays a floor and the cap a ceiling.
    """
    first_s, cap_s = fn.retry_backoff_s
    return Backoff(first_s, cap_s, jitter=(1.0, 1.5), rand=rand).delay_s(max(retry - 1, 0))


def after_failure(
    fn: FunctionConfig,
    *,
    attempt: int,
    retry_base: int,
    age_from: float,
    now: float,
    rand: Callable[[], float] = random.random,
) -> Verdict:
    """The verdict on an async invocation whose attempt number `attempt` just failed."""
    retry = attempt - retry_base  # attempts used since acceptance (or the last redrive)
    if retry > fn.retries:
        return Verdict(dead_letter=RETRIES_EXHAUSTED)
    next_attempt_at = now + backoff_s(fn, retry, rand)
    # Waiting only to find the event too old then helps nobody: dead-letter it now.
    if next_attempt_at - age_from > fn.max_event_age_s:
        return Verdict(dead_letter=EVENT_AGE_EXCEEDED)
    return Verdict(next_attempt_at=next_attempt_at)


def too_old(fn: FunctionConfig, age_from: float, now: float) -> bool:
    """A due retry of an event this old is not run (its first attempt always is)."""
    return now - age_from > fn.max_event_age_s
