"""The worker's channel to the daemon, and the worker's state, against a misbehaving handler.

The channel sits on a random descriptor from 100 up, so a handler writing to the descriptors it
guesses reaches nothing of the worker's; bytes that do reach it fail the call at once as
`crashed`. A handler that moves the working directory, leaves an alarm pending or closes or
replaces fd 1 and 2 has that undone after its call; one that stops the worker's event loop
gets the worker replaced. Either way the next call works.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.models import Outcome, Status
from daemon.pool import WorkerPool
from daemon.pool.protocol import Result, SupervisorChannel, encode_frame
from tests.daemon_proc import Gate
from tests.pool.conftest import BASIC, function, request
from tests.waits import LogWatch


def event(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def result(outcome: Outcome) -> Any:
    assert outcome.status is Status.SUCCEEDED, outcome.payload
    return json.loads(outcome.payload)


async def test_the_channel_is_on_a_random_high_descriptor_not_inherited(
    make_pool: Any,
) -> None:
    pool: WorkerPool = await make_pool(max_workers=1)
    seen = []
    for _ in range(3):  # a fresh worker each time: max_invocations_per_worker = 1
        fn = function("fds", "handler.descriptors", max_invocations_per_worker=1)
        found = result(await pool.invoke(fn, request(fn)))
        [(fd, inheritable)] = found["sockets"].items()
        assert 100 <= int(fd) < 1000 and inheritable is False
        assert found["argv"] == [found["argv"][0]]  # its number is not in sys.argv either
        seen.append(fd)
    assert len(set(seen)) > 1  # random: three workers on one descriptor is a 1 in 810,000 chance


async def test_garbage_written_to_guessed_descriptors_reaches_only_the_logs(
    pool: WorkerPool,
) -> None:
    fn = function("scribble", "handler.scribble")
    garbage = "\x00\x00\x00\x10\x04 garbage \xff\xfe"
    first = await pool.invoke(fn, request(fn, event(bytes=garbage)))
    assert result(first)["pid"] == first.worker_pid
    assert " garbage " in first.logs  # fd 1 and 2, and the capture file's own descriptor
    second = await pool.invoke(fn, request(fn, event(bytes="again")))
    assert second.worker_pid == first.worker_pid and "again" in second.logs


@pytest.mark.parametrize(
    "garbage",
    [
        "hello, channel\n",  # reads as a length of 1.7 GB
        "\x00\x00\x00\x64\x04" + "\x00" * 40,  # a Result head whose lengths do not add up
        "\x00\x00\x01\x00\x09",  # a plausible length, an unknown tag
        "\x00\x00\x00\x40\x04",  # a plausible Result head, then nothing: judged on the rest
    ],
    ids=["text", "lengths", "tag", "head-only"],
)
async def test_garbage_on_the_channel_itself_is_a_crash_at_once(
    pool: WorkerPool, garbage: str
) -> None:
    fn = function("corrupt", "handler.corrupt_channel", timeout_s=30.0)
    warm = await pool.invoke(fn, request(fn, event(bytes="")))  # its start is not timed
    started = time.perf_counter()
    outcome = await pool.invoke(fn, request(fn, event(bytes=garbage, s=0.2)))
    elapsed = time.perf_counter() - started
    assert outcome.status is Status.CRASHED, outcome.payload
    assert outcome.worker_pid == warm.worker_pid
    assert outcome.error_type == "Runtime.ExitError"
    assert elapsed < 1.0  # not the 1 s grace for an exit, nor the call's 30 s deadline
    fresh = await pool.invoke(fn, request(fn, event(bytes="")))
    assert fresh.status is Status.SUCCEEDED and fresh.worker_pid != outcome.worker_pid


async def test_garbage_on_the_channel_between_calls_ends_the_worker_at_once(
    pool: WorkerPool, tmp_path: Path, logs: LogWatch
) -> None:
    fn = function("later", "handler.corrupt_channel_later")
    go = Gate(tmp_path / "go")
    first = await pool.invoke(fn, request(fn, event(go=str(go.path))))
    assert first.status is Status.SUCCEEDED
    go.release()  # the handler's thread writes to the channel now, while the worker is idle
    # no call comes: the daemon ends the worker as the bytes arrive
    await logs.wait_for("worker_stopped", pid=first.worker_pid, reason="crashed")
    assert pool.stats() == {}  # no worker left, idle or busy
    second = await pool.invoke(fn, request(fn, event()))
    assert second.status is Status.SUCCEEDED and second.worker_pid != first.worker_pid


async def test_a_head_claiming_a_body_that_never_comes_is_refused_on_its_fixed_fields() -> None:
    loop = asyncio.get_running_loop()
    fixed = struct.Struct("!IBBqqIII")  # a Result's fixed fields (test_protocol.py)
    plausible = SupervisorChannel(loop)
    plausible.data_received(fixed.pack(fixed.size - 4 + 10, 4, 1 | 4 | 8, 1, 2, 0, 0, 10))
    assert not plausible.closed  # its body may well follow
    plausible.data_received(b"x" * 10)
    assert await plausible.receive() == Result(True, b"x" * 10, None, None, 1, False, 2)
    for head in [
        fixed.pack(fixed.size - 4 + 10, 4, 1 | 4 | 8, 1, 2, 0, 0, 9),  # lengths short of it
        fixed.pack(fixed.size - 4 + 10, 4, 128, 1, 2, 0, 0, 10),  # an unknown flag
        struct.pack("!IB", 100, 2),  # a Ready is 9 bytes, never 100
        struct.pack("!IB", 10, 4),  # shorter than a Result's fixed fields
    ]:
        channel = SupervisorChannel(loop)
        channel.data_received(head[:3])
        channel.data_received(head[3:])
        assert channel.closed and channel.corrupt, head
    whole = encode_frame(Result(True, b"{}", max_memory_kb=1, rss_kb=2))
    for cut in range(1, len(whole)):  # any prefix of a valid frame waits for the rest
        channel = SupervisorChannel(loop)
        channel.data_received(whole[:cut])
        assert not channel.closed, cut


# --- what a handler leaves behind ----------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["chdir", "alarm", "close_fds", "replace_fds", "sys_stdout", "sys_stderr"]
)
async def test_state_a_handler_breaks_is_restored_for_the_next_call(
    pool: WorkerPool, how: str
) -> None:
    fn = function("state", "handler.break_state")
    first = await pool.invoke(fn, request(fn, event(how=how)))
    before = result(first)
    assert before["cwd"] == str(BASIC) and before["alarm"] == 0
    assert "output of this call" in first.logs
    second = await pool.invoke(fn, request(fn, event()))
    after = result(second)
    assert second.worker_pid == first.worker_pid  # restored, not replaced
    assert after["cwd"] == str(BASIC)
    assert after["alarm"] == 0  # the alarm was cancelled: its SIGALRM would kill the worker
    assert after["stdout_ok"]
    assert "output of this call" in second.logs  # fd 1 and 2 capture again
    assert "logged by this call" in second.logs  # and logging writes to them


@pytest.mark.parametrize("how", ["now", "later"])
async def test_a_handler_that_stops_the_event_loop_gets_its_worker_replaced(
    pool: WorkerPool, how: str, logs: Any
) -> None:
    fn = function("stopper", "handler.stop_loop")
    first = await pool.invoke(fn, request(fn, event(how=how)))
    if first.status is Status.SUCCEEDED:
        assert "[lambdaemon] this worker is replaced" in first.logs
    second = await pool.invoke(fn, request(fn, event()))
    assert second.status is Status.SUCCEEDED, second.payload
    assert second.worker_pid != first.worker_pid
    third = await pool.invoke(fn, request(fn, event()))
    assert third.status is Status.SUCCEEDED and third.worker_pid == second.worker_pid
    stopped = [e for e in logs.find("worker_stopped") if e["pid"] == first.worker_pid]
    assert stopped and stopped[0]["reason"] == "recycled" and stopped[0]["why"] == "handler_state"
