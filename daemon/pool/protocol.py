"""Frames on the control socket between the supervisor and one worker, and both ends of it.

A frame is a 4-byte big-endian length and one msgpack-encoded message. After it starts, the worker
sends exactly one `Ready` or `InitFailed`; then, for every `Invoke` it receives, one `Result`.
The worker imports this module at start, so it imports nothing from the daemon and no asyncio.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import asyncio

HEADER_BYTES = 4
# Far above Lambda's 6 MB payload limits; a larger length means the stream is corrupt.
MAX_FRAME_BYTES = 64 * 1024 * 1024


class Invoke(msgspec.Struct, array_like=True, tag="invoke"):
    invocation_id: str
    event: bytes  # JSON text; empty means `{}`
    invoked_arn: str
    deadline_ms: int  # epoch milliseconds, for context.get_remaining_time_in_millis()
    client_context: str | None = None  # base64 JSON


class Ready(msgspec.Struct, array_like=True, tag="ready"):
    init_duration_ms: float


class InitFailed(msgspec.Struct, array_like=True, tag="init_failed"):
    error_type: str
    error_message: str
    payload: bytes  # Lambda's error JSON
    init_duration_ms: float


class Result(msgspec.Struct, array_like=True, tag="result"):
    ok: bool
    payload: bytes  # the handler's result JSON, or Lambda's error JSON
    error_type: str | None = None
    error_message: str | None = None
    max_memory_kb: int | None = None  # peak RSS during this invocation
    retire: bool = False  # the worker exits after this reply (out of memory)
    rss_kb: int | None = None  # resident memory as the reply is sent: what the worker keeps


FromWorker = Ready | InitFailed | Result
_ENCODER = msgspec.msgpack.Encoder()


def encode_frame(message: Invoke | FromWorker) -> bytearray:
    """One frame, built in a single buffer (no concatenation of header and body)."""
    frame = bytearray(HEADER_BYTES)
    _ENCODER.encode_into(message, frame, HEADER_BYTES)
    frame[:HEADER_BYTES] = (len(frame) - HEADER_BYTES).to_bytes(HEADER_BYTES, "big")
    return frame


class WorkerChannel:
    """The worker's end: blocking reads and writes on the inherited socket fd."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._decoder = msgspec.msgpack.Decoder(Invoke)

    def receive(self) -> Invoke | None:
        """The next invocation; None when the supervisor has gone."""
        buffer = self._buffer
        while True:
            if len(buffer) >= HEADER_BYTES:
                end = HEADER_BYTES + int.from_bytes(buffer[:HEADER_BYTES], "big")
                if len(buffer) >= end:
                    frame = bytes(buffer[HEADER_BYTES:end])
                    del buffer[:end]
                    return self._decoder.decode(frame)
            chunk = os.read(self._fd, 256 * 1024)
            if not chunk:
                return None
            buffer += chunk

    def send(self, message: FromWorker) -> None:
        view = memoryview(encode_frame(message))
        while view:
            view = view[os.write(self._fd, view) :]


class SupervisorChannel:
    """The supervisor's end, an asyncio protocol: frames in, one awaited reply at a time.

    After the channel closes (EOF, a corrupt frame, or `hang_up()`), `receive()` gives None.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = bytearray()
        self._inbox: deque[FromWorker | None] = deque()
        self._waiter: asyncio.Future[Any] | None = None
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(FromWorker)
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def receive(self) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        if self._inbox:
            future.set_result(self._inbox.popleft())
        elif self.closed:
            future.set_result(None)
        else:
            self._waiter = future
        return future

    def send(self, message: Invoke) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode_frame(message))

    def hang_up(self) -> None:
        if not self.closed:
            self.closed = True
            self._deliver(None)
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol callbacks (duck-typed: this module must not import asyncio)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if self.closed:
            transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if not buffer and int.from_bytes(data[:HEADER_BYTES], "big") == len(data) - HEADER_BYTES:
            self._deliver_frame(memoryview(data)[HEADER_BYTES:])  # the usual case: one whole frame
            return
        buffer += data
        while len(buffer) >= HEADER_BYTES:
            size = int.from_bytes(buffer[:HEADER_BYTES], "big")
            if size > MAX_FRAME_BYTES:
                self.hang_up()
                return
            if len(buffer) < HEADER_BYTES + size:
                return
            frame = bytes(buffer[HEADER_BYTES : HEADER_BYTES + size])
            del buffer[: HEADER_BYTES + size]
            self._deliver_frame(frame)

    def eof_received(self) -> None:
        self.hang_up()

    def connection_lost(self, exc: Exception | None) -> None:
        self.hang_up()

    def pause_writing(self) -> None:
        pass  # at most one frame is ever in flight; the transport buffers it

    def resume_writing(self) -> None:
        pass

    def _deliver_frame(self, frame: bytes | memoryview) -> None:
        try:
            message = self._decoder.decode(frame)
        except msgspec.DecodeError:
            self.hang_up()  # a corrupt stream: the worker is treated as crashed
        else:
            self._deliver(message)

    def _deliver(self, message: FromWorker | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        else:
            self._inbox.append(message)
