"""Where an async invocation's final outcome goes: its destination, decided in its final write.

When an async invocation reaches its final outcome (success, or a dead letter), the store
writes its final record and routes its destination in one transaction (Store.settle,
Store.dead_letter_waiting, Store.recover; daemon/store/settle.py). `Router` is the decision the
store calls there: which destination applies, and the record it gets. The outcome and its
destination are therefore committed together or not at all, and a crash in between can
neither lose nor repeat a delivery:

- `function:NAME` becomes a new queued async invocation (trigger `destination`, parent_id the
  source, event the record, hops + 1); after a crash the dispatcher resumes it like any other;
- `mqtt:TOPIC` and `webhook:URL` become an outbox row, which daemon/destinations/relay.py delivers
  and deletes once the target acknowledged it (or marks failed when it refused it for good).

A chain of functions that keeps triggering itself through destinations is stopped after
MAX_HOPS hops, as Lambda stops recursive loops: the hop beyond it is not run but recorded as a
dead letter (reason RecursiveInvocationException), where Lambda would send the event to the
DLQ. Redriving it runs it, and stops the chain again one hop later.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from daemon.config import FunctionConfig, parse_destination
from daemon.models import Status, new_id
from daemon.store.records import NewInvocation
from daemon.store.settle import Destination, FinalRecord
from daemon.untrusted import json_too_deep

SUCCESS = "Success"
RECURSIVE_INVOCATION = "RecursiveInvocationException"
MAX_HOPS = 16
TRIGGER = "destination"
_json = msgspec.json.Encoder()

Lookup = Callable[[str], FunctionConfig | None]  # the function's settings now, or None


class Router:
    """Decides where final outcomes go (a daemon.store.settle.Route).

    The store calls it in its database thread, so `lookup` must only read settings; it may call
    it again for the same outcome after rolling a write back, and it decides the same way.
    """

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup

    def __call__(self, final: FinalRecord, *, fresh_result: bool, now: float) -> Destination | None:
        if final.invocation_type != "async":
            return None  # destinations apply to async invocations only, as in Lambda
        fn = self._lookup(final.function)
        condition = SUCCESS if final.status == Status.SUCCEEDED else final.dead_letter_reason
        if fn is None or condition is None:
            return None
        destination = fn.on_success if condition == SUCCESS else fn.on_failure
        if destination is None:
            return None
        if fresh_result:
            response = _embedded(final.result)
        else:  # this final write did not run the handler: the last attempt's error stands for it
            response = {"errorMessage": final.error_message, "errorType": final.error_type}
        record = build_record(
            final.id, fn, condition, final.attempt, final.status, final.event, response, now
        )
        kind, target = parse_destination(destination)
        decided = Destination(kind, condition, destination, target, record)
        return self._hop(decided, final, now) if kind == "function" else decided

    def _hop(self, decided: Destination, final: FinalRecord, now: float) -> Destination:
        """`function:NAME`: a new queued invocation, or past MAX_HOPS one recorded, not run."""
        field = "on_success" if decided.condition == SUCCESS else "on_failure"
        # None after a reload removed the target: it is queued, and runs if it comes back.
        target_fn = self._lookup(decided.target)
        stop = final.hops >= MAX_HOPS
        child = NewInvocation(
            id=new_id(),
            function=decided.target,
            trigger=TRIGGER,
            trigger_id=f"{final.function}:{field}",
            function_version=target_fn.version if target_fn else "$LATEST",
            invocation_type="async",
            event=decided.record,
            queued_at=now,
            hops=final.hops + 1,
            dedupe_key=f"{TRIGGER}:{final.id}:{final.attempt}",
            parent_id=final.id,
            status=Status.FAILED if stop else Status.QUEUED,
        )
        message = f"not run: the chain reached {MAX_HOPS} destination hops"
        stopped = (RECURSIVE_INVOCATION, message) if stop else None
        return msgspec.structs.replace(decided, child=child, stopped=stopped)


def build_record(
    invocation_id: str,
    fn: FunctionConfig,
    condition: str,
    attempt: int,
    status: str,
    event: bytes,
    response: Any,
    now: float,
) -> bytes:
    """Lambda's destination record (lambda-compat.md 5.2) as JSON bytes."""
    context: dict[str, Any] = {"statusCode": 200, "executedVersion": fn.version}
    if status != Status.SUCCEEDED:
        context["functionError"] = "Unhandled"
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    return _json.encode(
        {
            "version": "1.0",
            "timestamp": stamp.replace("+00:00", "Z"),
            "requestContext": {
                "requestId": invocation_id,
                "functionArn": f"{fn.arn}:{fn.version}",  # always qualified, as Lambda does
                "condition": condition,
                "approximateInvokeCount": attempt,
            },
            "requestPayload": _embedded(event),
            "responseContext": context,
            "responsePayload": response,
        }
    )


def _embedded(raw: bytes | None) -> Any:
    """Stored JSON, embedded as it is (no re-encoding); text if it is not JSON after all."""
    if raw is None:
        return None
    raw = bytes(raw)
    try:
        if json_too_deep(raw):  # a handler's result may nest past what a parser's stack allows
            raise msgspec.DecodeError("nested too deep")
        msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw.decode("utf-8", "replace")
    return msgspec.Raw(raw)
