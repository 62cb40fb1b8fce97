"""Destination records, routed inside the final write of the invocation they describe.

When an async invocation reaches its final outcome (success, or a dead letter), `Router` runs
in the store's database thread, in the savepoint of that final write (the `extra_sql` of
Store.finish and Store.dead_letter_waiting, the `final_sql` of Store.recover). The outcome and
its destination are therefore committed together or not at all, and a crash in between can
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

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msgspec

from daemon.config import FunctionConfig, parse_destination
from daemon.models import Status, new_id
from daemon.store import records
from daemon.store.records import NewInvocation, QueuedInvocation
from daemon.store.sqlite import repeatable

SUCCESS = "Success"
RECURSIVE_INVOCATION = "RecursiveInvocationException"
MAX_HOPS = 16
TRIGGER = "destination"
_json = msgspec.json.Encoder()

Lookup = Callable[[str], FunctionConfig | None]  # the function's settings now, or None


class Routed(msgspec.Struct, frozen=True):
    """Where one final outcome went: the dispatcher logs it, runs `child` or wakes delivery."""

    kind: str  # function | mqtt | webhook | stopped (a function hop beyond MAX_HOPS)
    invocation_id: str  # the invocation whose outcome this is
    function: str
    condition: str  # Success | RetriesExhausted | EventAgeExceeded
    destination: str  # as configured
    hops: int = 0  # function and stopped: the new invocation's hops
    child: QueuedInvocation | None = None  # function: the queued invocation to run
    dead_letter_id: str | None = None  # stopped: the hop recorded instead of run
    chain_root: str | None = None  # stopped: the chain's first invocation
    outbox_id: int | None = None  # mqtt, webhook


class Router:
    """Routes final outcomes inside their final write; `routed` holds the result afterwards.

    Its methods run in the database thread, so `lookup` must only read settings. The store may
    roll a write back and run it again (store.repeatable): routing an invocation again
    replaces what the rolled-back run put in `routed`.
    """

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self.routed: list[Routed] = []

    def sql(
        self, invocation_id: str, *, fresh_result: bool
    ) -> Callable[[sqlite3.Connection], None]:
        """The `extra_sql` for the final write of `invocation_id`.

        `fresh_result`: that write stores this attempt's result (Store.finish), so it is the
        response payload; otherwise the payload is rebuilt from the recorded error.
        """
        return repeatable(
            partial(self._route, invocation_id=invocation_id, fresh_result=fresh_result)
        )

    def __call__(self, conn: sqlite3.Connection, invocation_id: str) -> None:
        """The `final_sql` of Store.recover: a dead letter of an interrupted attempt."""
        self._route(conn, invocation_id, fresh_result=False)

    def _route(self, conn: sqlite3.Connection, invocation_id: str, fresh_result: bool) -> None:
        if any(r.invocation_id == invocation_id for r in self.routed):  # run again: void
            self.routed[:] = [r for r in self.routed if r.invocation_id != invocation_id]
        routed = route(conn, invocation_id, self._lookup, fresh_result=fresh_result)
        if routed is not None:
            self.routed.append(routed)


def route(
    conn: sqlite3.Connection,
    invocation_id: str,
    lookup: Lookup,
    *,
    fresh_result: bool,
    now: float | None = None,
) -> Routed | None:
    """Write the destination of `invocation_id`'s final outcome, if it has one."""
    row = conn.execute(
        "SELECT function, invocation_type, status, attempt, hops, event, result, error_type,"
        " error_message, dead_letter_reason FROM invocations WHERE id = ?",
        (invocation_id,),
    ).fetchone()
    if row is None or row[1] != "async":
        return None  # destinations apply to async invocations only, as in Lambda
    function, _, status, attempt, hops, event, result, error_type, error_message, reason = row
    fn = lookup(function)
    condition = SUCCESS if status == Status.SUCCEEDED else reason
    if fn is None or condition is None:
        return None
    destination = fn.on_success if condition == SUCCESS else fn.on_failure
    if destination is None:
        return None
    now = time.time() if now is None else now
    if fresh_result:
        response = _embedded(result)
    else:  # this final write did not run the handler: the last attempt's error stands for it
        response = {"errorMessage": error_message, "errorType": error_type}
    record = build_record(invocation_id, fn, condition, attempt, status, event, response, now)
    kind, target = parse_destination(destination)
    base = Routed(kind, invocation_id, function, condition, destination)
    if kind == "function":
        field = "on_success" if condition == SUCCESS else "on_failure"
        return _queue_function(
            conn, base, target, record, f"{function}:{field}", attempt, hops, lookup, now
        )
    cur = conn.execute(
        "INSERT INTO outbox (invocation_id, attempt, condition, kind, target, record, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (invocation_id, attempt) DO NOTHING",
        (invocation_id, attempt, condition, kind, target, record, now),
    )
    if cur.rowcount == 0:
        return None  # this outcome was routed before (a repeated write)
    return msgspec.structs.replace(base, outbox_id=cur.lastrowid)


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


def _queue_function(
    conn: sqlite3.Connection,
    base: Routed,
    target: str,
    record: bytes,
    trigger_id: str,
    attempt: int,
    hops: int,
    lookup: Lookup,
    now: float,
) -> Routed | None:
    target_fn = lookup(target)  # None after a reload removed it: queued, runs if it returns
    child = NewInvocation(
        id=new_id(),
        function=target,
        trigger=TRIGGER,
        trigger_id=trigger_id,
        function_version=target_fn.version if target_fn else "$LATEST",
        invocation_type="async",
        event=record,
        queued_at=now,
        hops=hops + 1,
        dedupe_key=f"{TRIGGER}:{base.invocation_id}:{attempt}",
        parent_id=base.invocation_id,
        status=Status.FAILED if hops >= MAX_HOPS else Status.QUEUED,
    )
    _, created = records.insert(conn, child)
    if not created:
        return None
    if hops < MAX_HOPS:
        queued = QueuedInvocation(
            id=child.id,
            function=target,
            invocation_type="async",
            trigger=TRIGGER,
            event=record,
            attempt=0,
            queued_at=now,
            next_attempt_at=None,
            retry_base=0,
            age_from=now,
        )
        return msgspec.structs.replace(base, hops=child.hops, child=queued)
    conn.execute(
        "UPDATE invocations SET ended_at = ?, error_type = ?, error_message = ?,"
        " dead_letter_reason = ?, dead_lettered_at = ? WHERE id = ?",
        (
            now,
            RECURSIVE_INVOCATION,
            f"not run: the chain reached {MAX_HOPS} destination hops",
            RECURSIVE_INVOCATION,
            now,
            child.id,
        ),
    )
    return msgspec.structs.replace(
        base,
        kind="stopped",
        hops=hops,
        dead_letter_id=child.id,
        chain_root=_chain_root(conn, base.invocation_id),
    )


def _chain_root(conn: sqlite3.Connection, invocation_id: str) -> str:
    # Up the parent links while hops > 0: a replay's parent belongs to another chain.
    row = conn.execute(
        "WITH RECURSIVE chain (id, parent_id, hops) AS ("
        " SELECT id, parent_id, hops FROM invocations WHERE id = ?"
        " UNION ALL SELECT i.id, i.parent_id, i.hops FROM invocations i"
        " JOIN chain c ON i.id = c.parent_id WHERE c.hops > 0)"
        " SELECT id FROM chain ORDER BY hops LIMIT 1",
        (invocation_id,),
    ).fetchone()
    return str(row[0]) if row else invocation_id


def _embedded(raw: bytes | None) -> Any:
    """Stored JSON, embedded as it is (no re-encoding); text if it is not JSON after all."""
    if raw is None:
        return None
    raw = bytes(raw)
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw.decode("utf-8", "replace")
    return msgspec.Raw(raw)
