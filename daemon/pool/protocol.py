"""Frames on the control socket between the supervisor and one worker.

A frame is a 4-byte big-endian length and one msgpack-encoded message. After it starts, the worker
sends exactly one `Ready` or `InitFailed`; then, for every `Invoke` it receives, one `Result`.
The worker imports this module at start, so it imports nothing from the daemon.
"""

from __future__ import annotations

import msgspec

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


ToWorker = Invoke
FromWorker = Ready | InitFailed | Result


def encode_frame(encoder: msgspec.msgpack.Encoder, message: ToWorker | FromWorker) -> bytearray:
    """One frame, built in a single buffer (no concatenation of header and body)."""
    frame = bytearray(HEADER_BYTES)
    encoder.encode_into(message, frame, HEADER_BYTES)
    frame[:HEADER_BYTES] = (len(frame) - HEADER_BYTES).to_bytes(HEADER_BYTES, "big")
    return frame
