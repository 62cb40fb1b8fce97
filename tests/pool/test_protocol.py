"""The control-socket frames: every message survives the trip, and a worker's garbage cannot hurt.

The daemon decodes what worker processes send, and workers run user code, so any bytes at all
must end in either a message or the channel hanging up (receive() gives None), never in an
exception or a channel that waits forever.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from daemon.pool.protocol import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameError,
    InitFailed,
    Invoke,
    Ready,
    Result,
    SupervisorChannel,
    WorkerChannel,
    decode_frame,
    encode_frame,
)

# The wire format, written out here so that a change to it shows up as a failing test: the length
# header and a tag, then each message's fixed fields, then its variable ones in field order.
RESULT_FIXED = struct.Struct("!IBBqqIII")  # flags, max_memory_kb, rss_kb, 3 lengths
READY_FIXED = struct.Struct("!IBd")
RESULT_TAG, OK, RETIRE, HAS_PEAK, HAS_RSS, HAS_TYPE, HAS_MESSAGE = 4, 1, 2, 4, 8, 16, 32

ARN = "arn:aws:lambda:us-east-1:000000000000:function:hello"
BIG = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB, every byte value

MESSAGES = [
    Invoke("0190c2a4-5b7e-7c3d-9a1f-3e4b5c6d7e8f", b'{"name":"edge"}', ARN, 1719999999999),
    Invoke("ïd-✓-日本", b"", ARN, 0, client_context="eyJjdXN0b20iOiB7fX0="),
    Invoke("big", BIG, ARN, -1, ""),
    Ready(12.5),
    Ready(0.0),
    InitFailed(
        "Runtime.ImportModuleError",
        "Unable to import 'x': ✓ 日本 😀",
        b'{"errorType":"Runtime.ImportModuleError"}',
        3.25,
    ),
    InitFailed("", "", b"", 0.0),
    Result(True, b'{"ok":true}', max_memory_kb=15000, rss_kb=15000),
    Result(True, b""),
    Result(True, b"\x00raw bytes", None, None, 0, False, 0),
    Result(False, b'{"errorType":"ValueError"}', "ValueError", "boom ✓", 100, False, 200),
    Result(False, b"{}", "Runtime.OutOfMemory", "too big", 123, retire=True),
    Result(False, b"x", None, "a message, no type"),
    Result(False, b"x", "", ""),  # empty strings are not None
    Result(True, BIG, max_memory_kb=2**40, rss_kb=2**40),
    Result(True, b"{}", None, None, 10, False, 20, quiet=True),  # the usual reply, no output
    Result(False, b"{}", "ValueError", "boom", 10, False, 20, quiet=True),
]
FROM_WORKER = [message for message in MESSAGES if not isinstance(message, Invoke)]


def result_frame(
    flags: int = OK | HAS_PEAK | HAS_RSS,
    error_type: bytes = b"",
    error_message: bytes = b"",
    payload: bytes = b"{}",
    lengths: tuple[int, int, int] | None = None,
    size: int | None = None,
) -> bytes:
    """A Result frame built by hand; `lengths` and `size` may lie about what follows."""
    n_type, n_message, n_payload = lengths or (len(error_type), len(error_message), len(payload))
    body = error_type + error_message + payload
    if size is None:
        size = RESULT_FIXED.size - HEADER_BYTES + len(body)
    return RESULT_FIXED.pack(size, RESULT_TAG, flags, 1, 2, n_type, n_message, n_payload) + body


def with_size(frame: bytes) -> bytes:
    """`frame` with its length header set to what follows the header."""
    return struct.pack("!I", len(frame) - HEADER_BYTES) + frame[HEADER_BYTES:]


@pytest.fixture
async def channel() -> SupervisorChannel:
    return SupervisorChannel(asyncio.get_running_loop())


async def delivered(channel: SupervisorChannel) -> object:
    """What receive() gives right now; the channel must not be left waiting."""
    reply = channel.receive()
    assert reply.done(), "the channel is waiting for bytes that will never come"
    return reply.result()


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: object) -> None:
    frame = encode_frame(message)  # type: ignore[arg-type]
    assert int.from_bytes(frame[:HEADER_BYTES], "big") == len(frame) - HEADER_BYTES
    assert decode_frame(frame) == message


@pytest.mark.parametrize("message", FROM_WORKER, ids=lambda m: type(m).__name__)
async def test_supervisor_channel_delivers_every_reply(
    channel: SupervisorChannel, message: object
) -> None:
    channel.data_received(encode_frame(message))  # type: ignore[arg-type]
    assert await delivered(channel) == message
    assert not channel.closed


def test_messages_compare_and_print_by_field() -> None:
    result = Result(True, b"{}", max_memory_kb=1)
    assert result == Result(True, b"{}", None, None, 1, False, None)
    assert result != Result(True, b"{}", max_memory_kb=2)
    assert Ready(1.0) != InitFailed("", "", b"", 1.0)
    assert repr(Ready(1.5)) == "Ready(init_duration_ms=1.5)"
    assert "error_type=None" in repr(result)


def test_surrogates_arrive_as_backslash_text() -> None:
    # A user exception's message can hold lone surrogates (file names decoded with
    # surrogateescape): they must not break the frame, and the daemon only accepts valid UTF-8.
    sent = Result(False, b"{}", "OSError", "no such file: b\udcffd.txt", 1, False, 2)
    received = decode_frame(encode_frame(sent))
    assert isinstance(received, Result)
    assert received.error_message == "no such file: b\\udcffd.txt"
    failed = decode_frame(encode_frame(InitFailed("E\udc80", "m", b"", 1.0)))
    assert isinstance(failed, InitFailed) and failed.error_type == "E\\udc80"


async def test_frames_split_and_joined_arrive_whole_and_in_order(
    channel: SupervisorChannel,
) -> None:
    ready, result = encode_frame(Ready(2.0)), encode_frame(MESSAGES[7])
    channel.data_received(ready + result[:3])  # one frame and a bit, then the rest byte by byte
    for i in range(3, len(result)):
        channel.data_received(result[i : i + 1])
    assert await delivered(channel) == Ready(2.0)
    assert await delivered(channel) == MESSAGES[7]
    assert not channel.receive().done()  # nothing more: it waits for the next reply


@pytest.fixture
async def connected() -> AsyncIterator[tuple[SupervisorChannel, WorkerChannel, socket.socket]]:
    """Both ends on a real socket pair, the supervisor's end on the running loop."""
    loop = asyncio.get_running_loop()
    parent, child = socket.socketpair()
    supervisor = SupervisorChannel(loop)
    await loop.create_unix_connection(lambda: supervisor, sock=parent)  # type: ignore[arg-type]
    try:
        yield supervisor, WorkerChannel(child.fileno()), child
    finally:
        supervisor.hang_up()
        child.close()


async def test_both_ends_over_a_real_socket(
    connected: tuple[SupervisorChannel, WorkerChannel, socket.socket],
) -> None:
    supervisor, worker, _ = connected
    for message in FROM_WORKER:
        reply = supervisor.receive()
        await asyncio.to_thread(worker.send, message)  # 5 MiB replies go out in many writes
        assert await reply == message
    for invoke in [m for m in MESSAGES if isinstance(m, Invoke)]:
        supervisor.send(invoke)
        assert await asyncio.to_thread(worker.receive) == invoke
    supervisor.hang_up()
    assert await asyncio.to_thread(worker.receive) is None  # EOF: the worker exits


async def test_worker_end_sees_eof_in_the_middle_of_a_frame(
    connected: tuple[SupervisorChannel, WorkerChannel, socket.socket],
) -> None:
    supervisor, worker, _ = connected
    assert supervisor.transport is not None
    supervisor.transport.write(encode_frame(MESSAGES[0])[:10])
    supervisor.hang_up()  # closes after flushing what was written
    assert await asyncio.to_thread(worker.receive) is None


async def test_corrupt_reply_over_a_real_socket_hangs_up(
    connected: tuple[SupervisorChannel, WorkerChannel, socket.socket],
) -> None:
    supervisor, _, child = connected
    reply = supervisor.receive()
    child.sendall(result_frame(error_type=b"\xff\xfe", flags=OK | HAS_TYPE))
    assert await reply is None
    assert supervisor.closed


# --- what a misbehaving worker can send ---------------------------------------------------------

CORRUPT = {
    "unknown tag": with_size(struct.pack("!IB", 0, 99) + b"\x00" * 40),
    "tag zero": with_size(struct.pack("!IB", 0, 0) + b"\x00" * 40),
    "an Invoke, from a worker": encode_frame(MESSAGES[0]),
    "empty frame": struct.pack("!I", 0),
    "shorter than the fixed fields": with_size(result_frame()[:20]),
    "truncated, header adjusted": with_size(result_frame(payload=b"x" * 100)[:-1]),
    "payload length past the end": result_frame(payload=b"abc", lengths=(0, 0, 4)),
    "type length past the end": result_frame(
        flags=OK | HAS_TYPE, error_type=b"E", payload=b"", lengths=(2**32 - 1, 0, 0)
    ),
    "lengths short of the end": result_frame(payload=b"abc", lengths=(0, 0, 2)),
    "unknown flag bit": result_frame(flags=OK | 128),
    "a string marked absent": result_frame(flags=OK, error_type=b"E"),
    "error type not UTF-8": result_frame(flags=HAS_TYPE, error_type=b"\xff"),
    "encoded surrogate": result_frame(flags=HAS_MESSAGE, error_message=b"\xed\xb2\x80"),
    "Ready with a byte too many": with_size(encode_frame(Ready(1.0)) + b"\x00"),
    "Ready with NaN": READY_FIXED.pack(9, 2, float("nan")),
    "Ready with infinity": READY_FIXED.pack(9, 2, float("-inf")),
    "InitFailed cut short": with_size(encode_frame(MESSAGES[5])[:-1]),
}


@pytest.mark.parametrize("name", CORRUPT)
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
async def test_corrupt_frame_hangs_up(channel: SupervisorChannel, name: str, split: bool) -> None:
    frame = CORRUPT[name]
    if split:  # through the buffering path rather than the one-read fast path
        channel.data_received(frame[:3])
        channel.data_received(frame[3:])
    else:
        channel.data_received(frame)
    assert await delivered(channel) is None
    assert channel.closed
    channel.data_received(encode_frame(Ready(1.0)))  # nothing after the hang-up counts
    assert await delivered(channel) is None
    if name != "an Invoke, from a worker":  # a valid frame, in the wrong direction
        with pytest.raises(FrameError):
            decode_frame(frame)


async def test_oversized_frame_hangs_up_before_its_body_arrives(channel: SupervisorChannel) -> None:
    channel.data_received(struct.pack("!IB", MAX_FRAME_BYTES + 1, RESULT_TAG))
    assert await delivered(channel) is None


async def test_frame_cut_short_by_eof_hangs_up(channel: SupervisorChannel) -> None:
    channel.data_received(encode_frame(MESSAGES[7])[:-1])
    assert not channel.receive().done()
    channel.eof_received()
    assert await delivered(channel) is None


async def test_random_damage_never_raises_nor_hangs() -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(20240611)
    frames = [frame for frame in map(encode_frame, FROM_WORKER) if len(frame) < 1024]
    outcomes = {"message": 0, "hung up": 0}
    for _ in range(3000):
        frame = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 4)):
            what = rng.random() if frame else 1.0
            if what < 0.6:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            elif what < 0.8:
                del frame[rng.randrange(len(frame)) :]
            else:
                frame += rng.randbytes(rng.randint(1, 8))
        channel = SupervisorChannel(loop)
        cut = rng.randrange(len(frame) + 1)
        channel.data_received(bytes(frame[:cut]))
        channel.data_received(bytes(frame[cut:]))
        channel.eof_received()  # whatever it still waits for will not come
        first = await delivered(channel)
        outcomes["hung up" if first is None else "message"] += 1
        assert first is None or isinstance(first, Ready | InitFailed | Result)
    assert outcomes["message"] > 0 and outcomes["hung up"] > 0
