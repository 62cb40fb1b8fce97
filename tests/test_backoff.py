"""The backoff schedule as tables, with the random source injected."""

from __future__ import annotations

import pytest

from daemon.backoff import Backoff


def _never() -> float:
    raise AssertionError("a backoff without jitter draws no random number")


@pytest.mark.parametrize(
    ("first_s", "cap_s", "expected"),
    [
        (0.5, 30.0, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),  # cron, files, MQTT clients
        (0.5, 15.0, [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]),  # a store that refuses writes
        (2.0, 30.0, [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),  # store health probes
        (1.0, 60.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]),  # a trigger source's restarts
    ],
)
def test_backoff_doubles_from_first_up_to_cap(first_s: float, cap_s: float, expected: list[float]):
    backoff = Backoff(first_s, cap_s, rand=_never)
    assert [backoff.delay_s(n) for n in range(len(expected))] == expected
    assert [backoff.next() for _ in expected] == expected
    assert backoff.failures == len(expected)


@pytest.mark.parametrize(
    ("first_s", "cap_s", "jitter", "failures", "rand", "expected"),
    [
        # Reconnects: between half the nominal delay and all of it.
        (0.5, 30.0, (0.5, 1.0), 0, 0.0, 0.25),
        (0.5, 30.0, (0.5, 1.0), 0, 0.5, 0.375),
        (0.5, 30.0, (0.5, 1.0), 2, 0.999, 2.0 * (0.5 + 0.999 / 2)),
        (0.5, 30.0, (0.5, 1.0), 7, 0.0, 15.0),  # 64 s nominal: capped first, then jittered
        (0.5, 30.0, (0.5, 1.0), 7, 0.5, 22.5),
        # Channels: jitter only lengthens, by up to half, and the cap still holds after it.
        (0.5, 60.0, (1.0, 1.5), 0, 0.0, 0.5),
        (0.5, 60.0, (1.0, 1.5), 0, 0.5, 0.625),
        (0.5, 60.0, (1.0, 1.5), 6, 0.999, 32.0 * (1 + 0.999 / 2)),
        (0.5, 40.0, (1.0, 1.5), 6, 0.5, 40.0),
        (0.5, 40.0, (1.0, 1.5), 6, 0.999, 40.0),
        (0.5, 60.0, (1.0, 1.5), 20, 0.0, 60.0),
    ],
)
def test_backoff_jitter_scales_the_nominal_delay_within_the_cap(
    first_s: float,
    cap_s: float,
    jitter: tuple[float, float],
    failures: int,
    rand: float,
    expected: float,
):
    backoff = Backoff(first_s, cap_s, jitter=jitter, rand=lambda: rand)
    assert backoff.delay_s(failures) == expected


def test_backoff_reset_starts_the_schedule_over():
    backoff = Backoff(0.5, 30.0)
    assert [backoff.next(), backoff.next(), backoff.next()] == [0.5, 1.0, 2.0]
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next() == 0.5


def test_backoff_after_very_many_failures_is_the_cap():
    assert Backoff(0.5, 30.0).delay_s(10_000) == 30.0
    assert Backoff(0.5, 60.0, jitter=(1.0, 1.5), rand=lambda: 0.9).delay_s(10_000) == 60.0
