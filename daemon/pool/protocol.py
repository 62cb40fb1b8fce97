"""Frames on the control socket between the supervisor and one worker, and both ends of it.

A frame is a 4-byte big-endian length and one message. After it starts, the worker sends exactly
one `Ready` or `InitFailed`; then, for every `Invoke` it receives, one `Result`. The worker
imports this module at start, so it imports only the standard library: nothing from the daemon,
no asyncio, no msgspec.

A message is a tag byte and its fixed-width fields (network order, packed with the length header
by one `struct`), then its variable fields: UTF-8 strings and byte strings, whose lengths are
among the fixed fields. An optional field has a presence bit in a flags byte. The daemon decodes
what a worker sends, and a worker runs user code, so decoding trusts nothing: the lengths must add
up to the frame's exact size, unknown tags and flag bits are refused, text must be valid UTF-8,
durations finite. A frame that fails any of that makes the supervisor's end hang up, as if the
worker had died.
"""

from __future__ import annotations

import math
import os
import struct
from collections import deque

TYPE_CHECKING = False  # not typing's: the worker imports this module, and typing costs it
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from typing import Any

HEADER_BYTES = 4
# The environment variable that tells a worker its function's dependency folder (FunctionConfig
# .deps); the worker puts it on sys.path right after the code folder and removes the variable.
DEPS_ENV = "_LAMBDAEMON_DEPS"
# Lambda's limit on a response payload (the handler's result JSON, or its error JSON), in bytes.
# The worker refuses a larger one itself (Function.ResponseSizeTooLarge), before sending it.
MAX_RESPONSE_BYTES = 6_291_556
# An error type or message in a frame is cut to this many bytes of UTF-8 by the encoder; the
# error JSON in the payload keeps the message (within MAX_RESPONSE_BYTES).
MAX_ERROR_TEXT_BYTES = 64 * 1024
# The largest frame a worker can send: a payload at the limit, two error strings and the fixed
# fields, rounded up. A length header claiming more means the stream is corrupt (or the worker
# is not ours): the daemon hangs up before reading the body, so no worker makes it buffer more.
MAX_FRAME_BYTES = MAX_RESPONSE_BYTES + 4 * MAX_ERROR_TEXT_BYTES


class _Message:
    """Equality and repr field by field (plain classes: cheaper to build than a NamedTuple)."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Invoke(_Message):
    __slots__ = ("invocation_id", "event", "invoked_arn", "deadline_ms", "client_context")

    def __init__(
        self,
        invocation_id: str,
        event: bytes,
        invoked_arn: str,
        deadline_ms: int,
        client_context: str | None = None,
    ) -> None:
        self.invocation_id = invocation_id
        self.event = event  # JSON text; empty means `{}`
        self.invoked_arn = invoked_arn
        self.deadline_ms = deadline_ms  # epoch milliseconds, for get_remaining_time_in_millis()
        self.client_context = client_context  # base64 JSON


class Ready(_Message):
    __slots__ = ("init_duration_ms",)

    def __init__(self, init_duration_ms: float) -> None:
        self.init_duration_ms = init_duration_ms


class InitFailed(_Message):
    __slots__ = ("error_type", "error_message", "payload", "init_duration_ms")

    def __init__(
        self, error_type: str, error_message: str, payload: bytes, init_duration_ms: float
    ) -> None:
        self.error_type = error_type
        self.error_message = error_message
        self.payload = payload  # Lambda's error JSON
        self.init_duration_ms = init_duration_ms


class Result(_Message):
    __slots__ = (
        "ok",
        "payload",
        "error_type",
        "error_message",
        "max_memory_kb",
        "retire",
        "rss_kb",
        "quiet",
    )

    def __init__(
        self,
        ok: bool,
        payload: bytes,
        error_type: str | None = None,
        error_message: str | None = None,
        max_memory_kb: int | None = None,
        retire: bool = False,
        rss_kb: int | None = None,
        quiet: bool = False,
    ) -> None:
        self.ok = ok
        self.payload = payload  # the handler's result JSON, or Lambda's error JSON
        self.error_type = error_type
        self.error_message = error_message
        self.max_memory_kb = max_memory_kb  # peak RSS during this invocation
        self.retire = retire  # the worker exits after this reply (out of memory)
        self.rss_kb = rss_kb  # resident memory as the reply is sent: what the worker keeps
        self.quiet = quiet  # the capture file was empty as the reply was sent: nothing to read


FromWorker = Ready | InitFailed | Result


class FrameError(ValueError):
    """A frame that is not a well-formed message."""


# The fixed part of each frame: length header, tag, then the message's fixed fields.
_INVOKE, _READY, _INIT_FAILED, _RESULT = 1, 2, 3, 4
# flags (bit 0: client_context present), deadline_ms; then the lengths of invocation_id, event,
# invoked_arn and client_context, which follow in that order
_INVOKE_FIXED = struct.Struct("!IBBqIIII")
# init_duration_ms
_READY_FIXED = struct.Struct("!IBd")
# init_duration_ms; then the lengths of error_type, error_message and payload
_INIT_FAILED_FIXED = struct.Struct("!IBdIII")
# flags (below), max_memory_kb, rss_kb; then the lengths of error_type, error_message and payload
_RESULT_FIXED = struct.Struct("!IBBqqIII")
_OK, _RETIRE, _HAS_PEAK, _HAS_RSS, _HAS_TYPE, _HAS_MESSAGE, _QUIET = 1, 2, 4, 8, 16, 32, 64
_KNOWN_FLAGS = 127
_PLAIN_OK = _OK | _HAS_PEAK | _HAS_RSS  # the usual reply, with or without _QUIET
_SIZE = struct.Struct("!I")  # cheaper than int.from_bytes()


def _utf8(text: str) -> bytes:
    # A lone surrogate (in a file name in a user's exception, say) becomes the text "\udc80":
    # the frame stays valid UTF-8, which the other end insists on. (Inlined in _encode_invoke.)
    return text.encode("utf-8", "backslashreplace")


def _error_text(text: str) -> bytes:
    """An error type or message as UTF-8, cut to MAX_ERROR_TEXT_BYTES on a character boundary:
    a handler's exception message can be any size, and the frame must stay within its bound."""
    data = _utf8(text)
    if len(data) > MAX_ERROR_TEXT_BYTES:
        data = data[:MAX_ERROR_TEXT_BYTES].decode("utf-8", "ignore").encode()
    return data


# --- encoding ------------------------------------------------------------------------------------


def _encode_invoke(message: Invoke) -> bytes:
    event, context = message.event, message.client_context
    id_bytes = message.invocation_id.encode("utf-8", "backslashreplace")
    arn_bytes = message.invoked_arn.encode("utf-8", "backslashreplace")
    context_bytes = b"" if context is None else context.encode("utf-8", "backslashreplace")
    n_id, n_event, n_arn, n_context = len(id_bytes), len(event), len(arn_bytes), len(context_bytes)
    fixed = _INVOKE_FIXED.pack(
        _INVOKE_FIXED.size - HEADER_BYTES + n_id + n_event + n_arn + n_context,
        _INVOKE,
        context is not None,
        message.deadline_ms,
        n_id,
        n_event,
        n_arn,
        n_context,
    )
    return b"".join((fixed, id_bytes, event, arn_bytes, context_bytes))


def _encode_ready(message: Ready) -> bytes:
    return _READY_FIXED.pack(_READY_FIXED.size - HEADER_BYTES, _READY, message.init_duration_ms)


def _encode_init_failed(message: InitFailed) -> bytes:
    error_type, error_message = _error_text(message.error_type), _error_text(message.error_message)
    payload = message.payload
    fixed = _INIT_FAILED_FIXED.pack(
        _INIT_FAILED_FIXED.size
        - HEADER_BYTES
        + len(error_type)
        + len(error_message)
        + len(payload),
        _INIT_FAILED,
        message.init_duration_ms,
        len(error_type),
        len(error_message),
        len(payload),
    )
    return b"".join((fixed, error_type, error_message, payload))


def _encode_result(message: Result) -> bytes:
    payload, error_type, error_message = message.payload, message.error_type, message.error_message
    peak_kb, rss_kb = message.max_memory_kb, message.rss_kb
    flags = (
        (_OK if message.ok else 0)
        | (_RETIRE if message.retire else 0)
        | (_QUIET if message.quiet else 0)
    )
    if peak_kb is None:
        peak_kb = 0
    else:
        flags |= _HAS_PEAK
    if rss_kb is None:
        rss_kb = 0
    else:
        flags |= _HAS_RSS
    if error_type is None and error_message is None:  # a handler's result
        return (
            _RESULT_FIXED.pack(
                _RESULT_FIXED.size - HEADER_BYTES + len(payload),
                _RESULT,
                flags,
                peak_kb,
                rss_kb,
                0,
                0,
                len(payload),
            )
            + payload
        )
    type_bytes = message_bytes = b""
    if error_type is not None:
        type_bytes, flags = _error_text(error_type), flags | _HAS_TYPE
    if error_message is not None:
        message_bytes, flags = _error_text(error_message), flags | _HAS_MESSAGE
    fixed = _RESULT_FIXED.pack(
        _RESULT_FIXED.size - HEADER_BYTES + len(type_bytes) + len(message_bytes) + len(payload),
        _RESULT,
        flags,
        peak_kb,
        rss_kb,
        len(type_bytes),
        len(message_bytes),
        len(payload),
    )
    return b"".join((fixed, type_bytes, message_bytes, payload))


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Invoke: _encode_invoke,
    Ready: _encode_ready,
    InitFailed: _encode_init_failed,
    Result: _encode_result,
}


def encode_frame(message: Invoke | FromWorker) -> bytes:
    """One frame: the length header and the message, in a single buffer."""
    return _ENCODERS[type(message)](message)


# --- decoding ------------------------------------------------------------------------------------
# A decoder takes bytes that start with a frame's length header. When that length is not the
# size of what it was given (a frame split across reads, or two in one), it returns None and the
# caller buffers; otherwise it returns the message or raises ValueError (FrameError, or
# UnicodeDecodeError) or struct.error, checking the lengths before slicing anything.


def decode_frame(frame: bytes) -> Invoke | FromWorker:
    """The message in one whole frame; FrameError if the frame is not exactly one valid message."""
    frame = bytes(frame)
    try:
        message = _DECODERS[frame[HEADER_BYTES]](frame)
    except (LookupError, struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"not a valid frame: {exc!r}") from None
    if message is None:
        raise FrameError("the length header does not match the frame's size")
    return message  # type: ignore[no-any-return]


def _decode_invoke(frame: bytes) -> Invoke | None:
    size, _, flags, deadline_ms, n_id, n_event, n_arn, n_context = _INVOKE_FIXED.unpack_from(frame)
    end = len(frame)
    if size + HEADER_BYTES != end:
        return None
    at = _INVOKE_FIXED.size
    if at + n_id + n_event + n_arn + n_context != end:
        raise FrameError("the field lengths do not add up to the frame's size")
    if flags & ~1 or (n_context and not flags):
        raise FrameError("unknown flags")
    invocation_id = frame[at : at + n_id].decode()
    at += n_id
    event = frame[at : at + n_event]
    at += n_event
    arn = frame[at : at + n_arn].decode()
    context = frame[at + n_arn :].decode() if flags else None
    return Invoke(invocation_id, event, arn, deadline_ms, context)


def _decode_ready(frame: bytes) -> Ready | None:
    size, _, init_ms = _READY_FIXED.unpack_from(frame)
    if size + HEADER_BYTES != len(frame):
        return None
    if len(frame) != _READY_FIXED.size:
        raise FrameError("a Ready of the wrong size")
    return Ready(_finite(init_ms))


def _decode_init_failed(frame: bytes) -> InitFailed | None:
    size, _, init_ms, n_type, n_message, n_payload = _INIT_FAILED_FIXED.unpack_from(frame)
    end = len(frame)
    if size + HEADER_BYTES != end:
        return None
    at = _INIT_FAILED_FIXED.size
    if at + n_type + n_message + n_payload != end:
        raise FrameError("the field lengths do not add up to the frame's size")
    error_type = frame[at : at + n_type].decode()
    at += n_type
    error_message = frame[at : at + n_message].decode()
    payload = frame[at + n_message :]
    return InitFailed(error_type, error_message, payload, _finite(init_ms))


def _decode_result(frame: bytes) -> Result | None:
    size, _, flags, peak_kb, rss_kb, n_type, n_message, n_payload = _RESULT_FIXED.unpack_from(frame)
    end = len(frame)
    if size + HEADER_BYTES != end:
        return None
    at = _RESULT_FIXED.size
    if flags | _QUIET == _PLAIN_OK | _QUIET and at + n_payload == end:  # no error strings
        return Result(True, frame[at:], None, None, peak_kb, False, rss_kb, flags != _PLAIN_OK)
    if at + n_type + n_message + n_payload != end:
        raise FrameError("the field lengths do not add up to the frame's size")
    if (
        flags & ~_KNOWN_FLAGS
        or (n_type and not flags & _HAS_TYPE)
        or (n_message and not flags & _HAS_MESSAGE)
    ):
        raise FrameError("unknown flags, or a string marked absent")
    error_type = frame[at : at + n_type].decode() if flags & _HAS_TYPE else None
    at += n_type
    error_message = frame[at : at + n_message].decode() if flags & _HAS_MESSAGE else None
    return Result(
        flags & _OK != 0,
        frame[at + n_message :],
        error_type,
        error_message,
        peak_kb if flags & _HAS_PEAK else None,
        flags & _RETIRE != 0,
        rss_kb if flags & _HAS_RSS else None,
        flags & _QUIET != 0,
    )


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise FrameError("a duration that is not a finite number")
    return value


_FROM_WORKER: dict[int, Callable[[bytes], Any]] = {
    _READY: _decode_ready,
    _INIT_FAILED: _decode_init_failed,
    _RESULT: _decode_result,
}
_TO_WORKER: dict[int, Callable[[bytes], Any]] = {_INVOKE: _decode_invoke}
_DECODERS = {**_TO_WORKER, **_FROM_WORKER}


def _take_frame(buffer: bytearray) -> bytes | None:
    """The first whole frame in `buffer`, removed from it; None until one has arrived."""
    if len(buffer) < HEADER_BYTES:
        return None
    end = HEADER_BYTES + _SIZE.unpack_from(buffer)[0]
    if len(buffer) < end:
        return None
    if len(buffer) == end:  # the usual case: one copy, and the buffer's memory goes at once
        frame = bytes(buffer)
        buffer.clear()
        return frame
    frame = bytes(buffer[:end])
    del buffer[:end]
    return frame


def _plausible_head(buffer: bytearray) -> bool:
    """Whether the start of an incomplete frame from a worker can be the start of a valid one.

    Bytes a handler wrote to the channel read as a length header claiming a body that may never
    arrive: judged on the tag and fixed fields (whose lengths must add up to the header's size,
    flags known) as soon as those are in, the channel fails at once instead of waiting for the
    call's deadline.
    """
    if len(buffer) <= HEADER_BYTES:
        return True
    size: int = _SIZE.unpack_from(buffer)[0] + HEADER_BYTES
    tag = buffer[HEADER_BYTES]
    if tag == _READY:
        return size == _READY_FIXED.size
    if tag == _RESULT:
        if len(buffer) < _RESULT_FIXED.size:
            return size >= _RESULT_FIXED.size
        _, _, flags, _, _, n_type, n_message, n_payload = _RESULT_FIXED.unpack_from(buffer)
        return (
            not flags & ~_KNOWN_FLAGS
            and _RESULT_FIXED.size + n_type + n_message + n_payload == size
        )
    if tag == _INIT_FAILED:
        if len(buffer) < _INIT_FAILED_FIXED.size:
            return size >= _INIT_FAILED_FIXED.size
        _, _, _, n_type, n_message, n_payload = _INIT_FAILED_FIXED.unpack_from(buffer)
        lengths = n_type + n_message + n_payload
        return bool(_INIT_FAILED_FIXED.size + lengths == size)
    return False


# --- the two ends --------------------------------------------------------------------------------


class WorkerChannel:
    """The worker's end: blocking reads and writes on the inherited socket fd."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()

    def receive(self) -> Invoke | None:
        """The next invocation; None when the supervisor has gone."""
        buffer = self._buffer
        while (frame := _take_frame(buffer)) is None:
            # 64 KiB: glibc serves larger requests with mmap, which would cost an mmap, an
            # mremap and a munmap on every call for a bytes object that shrinks to ~150 bytes.
            chunk = os.read(self._fd, 64 * 1024)
            if not chunk:
                return None
            if not buffer and len(chunk) >= _INVOKE_FIXED.size and chunk[HEADER_BYTES] == _INVOKE:
                message = _decode_invoke(chunk)  # the usual case: one whole frame
                if message is not None:
                    return message
            buffer += chunk
        message = _TO_WORKER[frame[HEADER_BYTES]](frame)  # the supervisor is trusted: no checks
        assert message is not None
        return message  # type: ignore[no-any-return]

    def send(self, message: FromWorker) -> None:
        frame = encode_frame(message)
        written = os.write(self._fd, frame)
        if written < len(frame):  # a large reply: the socket takes it in parts
            view = memoryview(frame)[written:]
            while view:
                view = view[os.write(self._fd, view) :]


class Replies:
    """What a worker sends the pool, awaited one message at a time (`receive`); None once the
    channel is closed. The pool's side of every kind of worker channel."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._inbox: deque[FromWorker | None] = deque()
        self._waiter: asyncio.Future[Any] | None = None
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

    def _put(self, message: FromWorker | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        else:
            self._inbox.append(message)


class SupervisorChannel(Replies):
    """The supervisor's end, an asyncio protocol: frames in, one awaited reply at a time.

    After the channel closes (EOF, a corrupt frame, or `hang_up()`), `receive()` gives None;
    `corrupt` tells a corrupt frame (the worker is no longer speaking the protocol: the pool
    kills it at once) from an orderly EOF (the worker is exiting: the pool lets it).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.corrupt = False
        # Called once on a corrupt frame: the pool ends a worker that sent one between calls
        # (a waiting caller learns of it from receive() instead).
        self.on_corrupt: Callable[[], object] | None = None

    def send(self, message: Invoke) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(_encode_invoke(message))

    def hang_up(self) -> None:
        if not self.closed:
            self.closed = True
            self._put(None)
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol callbacks (duck-typed: this module must not import asyncio)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if self.closed:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._buffer:  # the usual case: `data` is one whole frame
            try:
                message = _FROM_WORKER[data[HEADER_BYTES]](data)
            except (LookupError, struct.error):
                message = None  # too short or an unknown tag: judged below, once buffered
            except ValueError:
                self._refuse()
                return
            if message is not None:
                self._put(message)
                return
        buffer = self._buffer
        buffer += data
        while not self.closed:
            if len(buffer) >= HEADER_BYTES and _SIZE.unpack_from(buffer)[0] > MAX_FRAME_BYTES:
                self._refuse()  # before the body: the daemon never buffers more than the bound
                return
            if (frame := _take_frame(buffer)) is None:
                if not _plausible_head(buffer):
                    self._refuse()  # now, not after waiting for a body that may never come
                return
            try:
                message = _FROM_WORKER[frame[HEADER_BYTES]](frame)
            except (LookupError, ValueError, struct.error):
                message = None
            if message is None:
                self._refuse()
            else:
                self._put(message)

    def eof_received(self) -> None:
        self.hang_up()

    def connection_lost(self, exc: Exception | None) -> None:
        self.hang_up()

    def pause_writing(self) -> None:
        pass  # at most one frame is ever in flight; the transport buffers it

    def resume_writing(self) -> None:
        pass

    def _refuse(self) -> None:
        """A frame that is not a valid message: the worker is treated as crashed."""
        self.corrupt = True
        self.hang_up()
        if self.on_corrupt is not None:
            self.on_corrupt()
