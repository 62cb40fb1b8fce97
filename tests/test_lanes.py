"""A lane's batching (daemon/lanes.py) on a real event loop: what it starts, and when.

The lane's `start` and `start_batch` here record what they are handed and keep the slot until
the test frees it, as the dispatcher does until an attempt ends.
"""

from __future__ import annotations

import asyncio

import msgspec

from daemon.config import FunctionConfig
from daemon.lanes import Backlogged, Lane
from triggers.files import FilesTriggerConfig


def fn(batch_size: int = 3, window_s: float = 0.2, concurrency: int = 1) -> FunctionConfig:
    batched = FilesTriggerConfig(path="in", batch_size=batch_size, batch_window_s=window_s)
    single = FilesTriggerConfig(path="other")
    return FunctionConfig(
        handler="h.h", name="f", concurrency=concurrency, triggers=[batched, single]
    )


def item(n: int, trigger: str = "f#0", version: str = "$LATEST") -> Backlogged:
    # Accepted in the order of n (age_from is the acceptance time).
    return Backlogged(f"id{n}", b"{}", 0, "files", 0, float(n), version, trigger)


class Started:
    """What the lane started, in order: a list of ids per batch, one id per single."""

    def __init__(self) -> None:
        self.runs: list[list[str] | str] = []
        self.changed = asyncio.Event()

    def single(self, lane: Lane, it: Backlogged) -> None:
        self.runs.append(it.id)
        self.changed.set()

    def batch(self, lane: Lane, items: list[Backlogged]) -> None:
        self.runs.append([it.id for it in items])
        self.changed.set()

    async def next(self, timeout_s: float = 2.0) -> list[str] | str:
        async with asyncio.timeout(timeout_s):
            while not self.runs:
                self.changed.clear()
                await self.changed.wait()
        return self.runs.pop(0)


def lane_of(config: FunctionConfig, started: Started) -> Lane:
    return Lane(config, started.single, asyncio.get_running_loop(), start_batch=started.batch)


async def test_lane_starts_a_full_batch_at_once_and_the_rest_after_the_window() -> None:
    started = Started()
    lane = lane_of(fn(batch_size=3, window_s=0.2), started)
    loop = asyncio.get_running_loop()
    first = loop.time()
    for n in range(4):
        lane.push(item(n))
    assert await started.next() == ["id0", "id1", "id2"]  # full: no wait for the window
    lane.release()
    assert await started.next() == ["id3"]  # alone: it waited out its window
    assert loop.time() - first >= 0.2
    lane.release()
    assert lane.running == 0 and not lane.holding()


async def test_lane_keeps_batches_to_one_version_and_takes_turns_with_the_backlog() -> None:
    started = Started()
    lane = lane_of(fn(batch_size=10, window_s=0.0), started)
    lane.running = 1  # busy: everything below waits
    lane.push(item(0))
    lane.push(item(1, version="2"))
    lane.push(item(2, trigger="f#1"))  # not batched: the backlog
    lane.push(item(3, trigger="f#1"))
    lane.release()
    # The two take turns; a batch stops where the version changes.
    assert await started.next() == "id2"
    lane.release()
    assert await started.next() == ["id0"]
    lane.release()
    assert await started.next() == "id3"
    lane.release()
    assert await started.next() == ["id1"]


async def test_lane_retries_items_due_together_as_one_batch() -> None:
    started = Started()
    lane = lane_of(fn(batch_size=10, window_s=0.0), started)
    at = asyncio.get_running_loop().time()
    failed = [item(n) for n in (2, 0, 1)]
    lane.push_all_at(failed, 0.0)  # due at once, on one timer
    assert lane.holding() == {"id0", "id1", "id2"}
    assert await started.next() == ["id0", "id1", "id2"]  # in the order they were accepted
    assert asyncio.get_running_loop().time() - at < 1


async def test_lane_reload_without_batching_hands_gathered_items_to_the_backlog() -> None:
    started = Started()
    lane = lane_of(fn(batch_size=5, window_s=60), started)
    lane.running = 1
    lane.push(item(0))
    lane.push(item(1))
    lane.fn = msgspec.structs.replace(fn(), triggers=[FilesTriggerConfig(path="in")])
    lane.release()
    assert await started.next() == "id0"
    lane.release()
    assert await started.next() == "id1"


async def test_lane_pause_forgets_gathered_items_and_their_window() -> None:
    started = Started()
    lane = lane_of(fn(batch_size=5, window_s=0.05), started)
    lane.push(item(0))
    assert lane.holding() == {"id0"}
    (gathering,) = lane.gathering.values()
    window = gathering.timer
    assert window is not None
    lane.pause(RuntimeError("stopping"))
    assert not lane.holding() and lane.budget.held == 0
    # the window's timer is gone: nothing can start from the paused lane when it would end
    assert window.cancelled() and gathering.timer is None
    assert started.runs == []
