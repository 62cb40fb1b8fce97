"""Results near Lambda's 6,291,556-byte response limit: refused in the worker, bounded on the wire.

A handler's result JSON over the limit fails the call with Lambda's Function.ResponseSizeTooLarge
on every path (the pool's Outcome; the Invoke API's 200 with X-Amz-Function-Error; a sync
webhook's 502; an async call's retries and its destination record), and the worker goes on
serving. The frame a worker can send is bounded, and the daemon refuses a longer one before
reading its body.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from daemon.http.webhooks import to_response
from daemon.models import Status
from daemon.pool import WorkerPool
from daemon.pool.protocol import (
    HEADER_BYTES,
    MAX_ERROR_TEXT_BYTES,
    MAX_FRAME_BYTES,
    MAX_RESPONSE_BYTES,
    Result,
    SupervisorChannel,
    encode_frame,
)
from tests.daemon_proc import free_port, running_daemon
from tests.destinations.test_destinations import child_of
from tests.pool.conftest import BASIC, FUNCTIONS, function, request
from tests.test_retries import dispatching, final

LIMIT = 6_291_556  # Lambda's documented figure, written out: the constant must equal it
TOO_LARGE = "Function.ResponseSizeTooLarge"


def too_large_message(size: int) -> str:
    return (
        f"Response payload size ({size} bytes) exceeded maximum allowed payload size "
        f"({LIMIT} bytes)."
    )


def event(size: int, **fields: Any) -> bytes:
    return json.dumps({"bytes": size, **fields}).encode()


def test_the_limit_is_lambdas() -> None:
    assert MAX_RESPONSE_BYTES == LIMIT


@pytest.mark.parametrize(
    "shape", [{}, {"char": "é"}, {"raw": True}], ids=["ascii", "two-byte", "bytes"]
)
async def test_result_at_the_limit_passes_and_one_byte_more_fails(
    pool: WorkerPool, shape: dict[str, Any]
) -> None:
    fn = function("sized", "handler.sized", memory_mb=256)
    at = await pool.invoke(fn, request(fn, event(LIMIT, **shape)))
    assert at.status is Status.SUCCEEDED, at.payload[:200]
    assert len(at.payload) == LIMIT
    step = len(shape.get("char", "x").encode())  # the smallest step a string can grow by
    over = await pool.invoke(fn, request(fn, event(LIMIT + step, **shape)))
    assert over.status is Status.FAILED
    assert (over.error_type, over.error_message) == (TOO_LARGE, too_large_message(LIMIT + step))
    assert json.loads(over.payload) == {
        "errorMessage": too_large_message(LIMIT + step),
        "errorType": TOO_LARGE,
    }
    assert f"[ERROR] {TOO_LARGE}: Response payload size" in over.logs
    after = await pool.invoke(fn, request(fn, event(10)))
    assert after.status is Status.SUCCEEDED and after.payload == b'"xxxxxxxx"'
    assert at.worker_pid == over.worker_pid == after.worker_pid  # still the same worker


async def test_a_300_mb_result_is_too_large_not_a_crash(pool: WorkerPool) -> None:
    fn = function("huge", "handler.sized", memory_mb=1024, timeout_s=60.0)  # a loaded VM is slow
    size = 300 * 1024 * 1024
    outcome = await pool.invoke(fn, request(fn, event(size)))
    assert outcome.status is Status.FAILED, outcome.payload
    assert (outcome.error_type, outcome.error_message) == (TOO_LARGE, too_large_message(size))
    again = await pool.invoke(fn, request(fn, event(4)))
    assert again.status is Status.SUCCEEDED and again.worker_pid == outcome.worker_pid


async def test_an_error_over_the_limit_keeps_its_type_and_the_start_of_its_message(
    pool: WorkerPool,
) -> None:
    fn = function("long_error", "handler.fail_long", memory_mb=256)
    chars = 10 * 1024 * 1024
    outcome = await pool.invoke(fn, request(fn, json.dumps({"chars": chars}).encode()))
    assert outcome.status is Status.FAILED and outcome.error_type == "ValueError"
    assert len(outcome.payload) <= LIMIT
    body = json.loads(outcome.payload)
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"].startswith("mmmm")
    assert body["errorMessage"].endswith(f"[lambdaemon: truncated from {chars} characters]")
    assert body["stackTrace"] and "in fail_long" in body["stackTrace"][-1]
    assert outcome.error_message is not None
    assert len(outcome.error_message.encode()) == MAX_ERROR_TEXT_BYTES  # cut for the frame
    again = await pool.invoke(fn, request(fn, json.dumps({"chars": 3}).encode()))
    assert again.error_message == "mmm" and again.worker_pid == outcome.worker_pid


# --- the frame bound -----------------------------------------------------------------------------


def test_the_largest_reply_a_worker_can_build_fits_the_frame_bound() -> None:
    # a payload at the limit, and error strings far longer than kept, some of them multibyte
    largest = Result(False, b"x" * LIMIT, "T" * 10**6, "é✓" * 10**6, 2**40, True, 2**40)
    frame = encode_frame(largest)
    assert len(frame) - HEADER_BYTES <= MAX_FRAME_BYTES
    assert len(frame) > LIMIT + 2 * MAX_ERROR_TEXT_BYTES - 8  # the strings were kept, cut


async def test_the_daemon_reads_a_frame_at_the_bound_and_refuses_one_past_it() -> None:
    loop = asyncio.get_running_loop()
    fixed = struct.Struct("!IBBqqIII")  # a Result's fixed fields (test_protocol.py)
    n_payload = MAX_FRAME_BYTES - (fixed.size - HEADER_BYTES)
    head = fixed.pack(MAX_FRAME_BYTES, 4, 1 | 4 | 8, 1, 2, 0, 0, n_payload)
    at_bound = SupervisorChannel(loop)
    at_bound.data_received(head)
    at_bound.data_received(b"p" * n_payload)
    message = await at_bound.receive()
    assert isinstance(message, Result) and len(message.payload) == n_payload
    past = SupervisorChannel(loop)
    past.data_received(fixed.pack(MAX_FRAME_BYTES + 1, 4, 1 | 4 | 8, 1, 2, 0, 0, n_payload + 1))
    assert past.closed and past.corrupt  # refused on its header, before any of its body
    assert await past.receive() is None


# --- every path a call can take ------------------------------------------------------------------


async def test_sync_webhook_answers_502_for_a_result_too_large(pool: WorkerPool) -> None:
    fn = function("hook", "handler.sized", memory_mb=256)
    outcome = await pool.invoke(fn, request(fn, event(LIMIT + 1), invocation_id="req-big"))
    response = to_response("req-big", outcome)
    assert response.status == 502 and response.headers["x-amzn-RequestId"] == "req-big"
    assert TOO_LARGE not in (response.text or "")  # the error stays in the record


async def test_invoke_api_and_a_sync_webhook_answer_like_lambda(tmp_path: Path) -> None:
    port = free_port()
    body = (
        f'[webhooks]\nlisten = "127.0.0.1:{port}"\n'
        f'[functions.big]\nhandler = "handler.sized"\ncode = "{BASIC}"\nmemory_mb = 256\n'
        '[[functions.big.triggers]]\ntype = "webhook"\npath = "/big"\n'
    )
    async with running_daemon(tmp_path, body) as daemon:
        assert daemon.session is not None
        url = f"http://127.0.0.1:{port}/big"
        async with daemon.session.post(url, json={"bytes": LIMIT + 1}) as response:
            assert response.status == 502
            assert TOO_LARGE not in await response.text()  # the error stays in the record
        async with daemon.session.post(url, json={"bytes": 100}) as response:
            assert response.status == 200 and len(await response.read()) == 100
        status, headers, answer = await daemon.invoke("big", {"bytes": LIMIT + 8})
        assert status == 200 and headers["X-Amz-Function-Error"] == "Unhandled"
        assert json.loads(answer) == {
            "errorMessage": too_large_message(LIMIT + 8),
            "errorType": TOO_LARGE,
        }
        status, headers, answer = await daemon.invoke("big", {"bytes": LIMIT})
        assert status == 200 and "X-Amz-Function-Error" not in headers
        assert len(answer) == LIMIT


async def test_async_call_retries_then_its_destination_record_carries_the_error(
    tmp_path: Path,
) -> None:
    big = function(
        "big",
        "handler.sized",
        memory_mb=256,
        retries=1,
        retry_backoff_s=(0.05, 0.2),
        on_failure="function:archive",
    )
    async with dispatching(tmp_path / "db", big, function("archive", "handler.echo")) as (
        dispatcher,
        store,
    ):
        accepted = await dispatcher.accept(
            "big", {"bytes": LIMIT + 1}, trigger="test", trigger_id="t#0"
        )
        assert await final(dispatcher, accepted.invocation_id) == "failed"
        record = await store.get(accepted.invocation_id)
        child = await child_of(store, accepted.invocation_id)
    assert record is not None
    assert [attempt["error_type"] for attempt in record["attempts"]] == [TOO_LARGE, TOO_LARGE]
    destination = json.loads(child["event"])
    assert destination["requestContext"]["condition"] == "RetriesExhausted"
    assert destination["responseContext"]["functionError"] == "Unhandled"
    assert destination["responsePayload"] == {
        "errorMessage": too_large_message(LIMIT + 1),
        "errorType": TOO_LARGE,
    }


async def test_an_init_error_over_the_limit_is_cut_and_reported(pool: WorkerPool) -> None:
    fn = function("init_huge", "handler.handler", code=FUNCTIONS / "init_huge", memory_mb=256)
    outcome = await pool.invoke(fn, request(fn))
    assert outcome.status is Status.FAILED and outcome.error_type == "RuntimeError"
    assert len(outcome.payload) <= LIMIT
    body = json.loads(outcome.payload)
    assert body["errorMessage"].startswith("iiii")
    assert body["errorMessage"].endswith(
        f"[lambdaemon: truncated from {10 * 1024 * 1024} characters]"
    )
    assert outcome.error_message is not None
    assert len(outcome.error_message.encode()) == MAX_ERROR_TEXT_BYTES
