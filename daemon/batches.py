"""Batches, as Lambda's event source mappings deliver queue and stream records.

A trigger with `batch_size` > 1 (mqtt, files) keeps today's durable intake: each message or
file is committed as its own queued invocation before it is acknowledged. Batching happens when
its lane starts work (daemon/lanes.py gathers the items): one handler call gets

    {"Records": [record, record, ...]}

where each record is the item's event exactly as a single invocation would get it, plus
`messageId`: the item's invocation id (stable across its attempts, as an SQS message id is), the
identifier `batchItemFailures` names. Powertools' `BatchProcessor(event_type=EventType.SQS)`
reads exactly that field. An event that is not a JSON object is wrapped as
`{"messageId": ..., "body": event}`.

The batch invocation has its own record (trigger `batch`, batch_id = its id) with the event the
handler got, its result, logs and metering; each item's row and attempts name the batch they ran
in (batch_id). What the handler's outcome means for the items, as Lambda's
ReportBatchItemFailures (see `failed_items`):

- it returned, without `batchItemFailures` (or with an empty or null list): every item succeeded;
- `{"batchItemFailures": [{"itemIdentifier": id}, ...]}` naming items of the batch: those failed,
  the others succeeded;
- a malformed list (not a list, an entry without a non-empty string `itemIdentifier`, an id not
  in the batch): the whole batch failed (InvalidBatchResponse);
- an exception, a timeout or a crash: every item failed with that outcome.

A failed item is retried by its function's policy with its own attempt count and age; the items
of one batch that are retried together come due together and so run as one smaller batch, and
each one that runs out of retries is dead-lettered on its own. A daemon crash mid-batch leaves
its items `running`: the next start records that attempt crashed for each and retries them.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from daemon.backoff import Backoff
from daemon.errors import StoreUnavailableError
from daemon.lanes import Backlogged, Lane
from daemon.models import InvokeRequest, Outcome, Status, new_id
from daemon.retry import EVENT_AGE_EXCEEDED, after_failure, too_old
from daemon.store.sqlite import BatchItem, NewInvocation
from daemon.versions import invoked_arn

if TYPE_CHECKING:
    from daemon.dispatcher import Dispatcher

log = structlog.get_logger("lambdaemon.dispatcher")

TRIGGER = "batch"  # the `trigger` of a batch invocation's own record
ITEM_FAILED = "BatchItemFailure"  # error type of an item its handler reported failed
INVALID_RESPONSE = "InvalidBatchResponse"  # ... of every item of a batch whose list was malformed
STORE_BACKOFF = Backoff(0.5, 15.0)  # a batch's outcome the store could not take: tried again
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def build_event(items: Iterable[tuple[str, bytes]]) -> bytes:
    """The handler's event for (invocation id, event JSON) items, in order."""
    records = []
    for invocation_id, event in items:
        decoded = _decode.decode(event)
        if isinstance(decoded, dict):
            decoded["messageId"] = invocation_id
        else:
            decoded = {"messageId": invocation_id, "body": decoded}
        records.append(_json.encode(decoded))
    return b'{"Records":[' + b",".join(records) + b"]}"


def failed_items(payload: bytes, ids: set[str]) -> set[str] | str:
    """The ids a successful handler's response reports failed, or why the response fails all."""
    try:
        response = _decode.decode(payload)
    except msgspec.DecodeError:
        return "the handler's response is not JSON"
    if not isinstance(response, dict) or response.get("batchItemFailures") is None:
        return set()
    failures = response["batchItemFailures"]
    if not isinstance(failures, list):
        return "batchItemFailures is not a list"
    failed = set()
    for i, entry in enumerate(failures):
        item = entry.get("itemIdentifier") if isinstance(entry, dict) else None
        if not isinstance(item, str) or not item:
            return f"batchItemFailures[{i}] has no itemIdentifier string"
        if item not in ids:
            return f"batchItemFailures[{i}].itemIdentifier {item!r} is no item of this batch"
        failed.add(item)
    return failed


def item_outcomes(outcome: Outcome, batch_id: str, ids: list[str]) -> dict[str, Outcome]:
    """What the batch's outcome means for each item (see the module doc)."""
    if outcome.status is not Status.SUCCEEDED:
        return {id: outcome for id in ids}
    failed = failed_items(outcome.payload, set(ids))
    if isinstance(failed, str):
        error_type, message, failed = INVALID_RESPONSE, failed, set(ids)
    else:
        error_type, message = ITEM_FAILED, f"reported failed by its batch {batch_id}"
    base = msgspec.structs.replace(outcome, payload=b"null", logs="", init_duration_ms=None)
    error = msgspec.structs.replace(
        base,
        status=Status.FAILED,
        payload=_json.encode({"errorMessage": message, "errorType": error_type}),
        error_type=error_type,
        error_message=message,
    )
    return {id: error if id in failed else base for id in ids}


class BatchRunner:
    """Runs the batches a dispatcher's lanes start, with the dispatcher's pool and store."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    async def run(self, lane: Lane, items: list[Backlogged]) -> None:
        """One batch, from its start to every item's settled outcome; holds one lane slot."""
        d, fn = self._d, lane.fn
        released = False
        try:
            items = await self._drop_too_old(lane, items)
            events = await self._events(lane, items)
            if not events:
                return
            batch_id = new_id()
            body = build_event((item.id, events[item.id]) for item in items)
            started_at = time.time()
            running = [(item.id, item.attempt + 1) for item in items]
            try:
                # Committed before the handler starts: a crash mid-batch is an attempt of each.
                await asyncio.shield(d._store.mark_batch_running(batch_id, running, started_at))
            except StoreUnavailableError as exc:
                for item in items:
                    d._not_started(lane, item, exc)
                return
            version = items[0].version
            request = InvokeRequest(batch_id, body, invoked_arn(fn, version))
            try:
                target = d._version_of(lane.fn, version)
                if isinstance(target, Outcome):
                    outcome = target
                else:
                    outcome = await d._run(target, request, attempt=1)
            except asyncio.CancelledError:
                outcome = d._interrupted(started_at)
                log.warning("batch_interrupted", batch_id=batch_id, function=fn.name)
                await asyncio.shield(self._settle(lane, items, batch_id, body, outcome))
                raise
            released = True
            lane.release()
            await self._settle_until_stored(lane, items, batch_id, body, outcome)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Its rows stay queued or running; the next start recovers them. Say so loudly.
            log.error(
                "batch_not_recorded",
                function=fn.name,
                invocation_ids=[item.id for item in items],
                error=repr(exc),
            )
        finally:
            if not released:
                lane.release()
            for item in items:
                d._in_flight.discard(item.id)

    async def _drop_too_old(self, lane: Lane, items: list[Backlogged]) -> list[Backlogged]:
        """Dead-letter the retries that came due too late (as a single one would be)."""
        d, now, kept = self._d, time.time(), []
        for item in items:
            if item.attempt > item.retry_base and too_old(lane.fn, item.age_from, now):
                settled = await asyncio.shield(
                    d._store.dead_letter_waiting(item.id, EVENT_AGE_EXCEEDED, route=d._router)
                )
                d._dead_lettered(lane, item, item.attempt, settled.status, EVENT_AGE_EXCEEDED)
                d._routed(settled.routed)
                d._in_flight.discard(item.id)
            else:
                kept.append(item)
        items[:] = kept
        return kept

    async def _events(self, lane: Lane, items: list[Backlogged]) -> dict[str, bytes]:
        """Each item's event; those that waited without it are read back in one query."""
        events = {item.id: item.event for item in items if item.event is not None}
        missing = [item.id for item in items if item.event is None]
        if missing:
            try:
                events.update(await self._d._store.events_of(missing))
            except StoreUnavailableError as exc:
                for item in items:
                    self._d._not_started(lane, item, exc)
                return {}
            if len(events) < len(items):
                gone = [item.id for item in items if item.id not in events]
                raise LookupError(f"invocations {gone} are not in the store")
        return events

    async def _settle_until_stored(
        self, lane: Lane, items: list[Backlogged], batch_id: str, body: bytes, outcome: Outcome
    ) -> None:
        """_settle; while the store cannot take writes, keep the outcome and try again (the
        items stay `running` meanwhile, so a stop before it lands recovers them)."""
        for tries in itertools.count():
            try:
                await asyncio.shield(self._settle(lane, items, batch_id, body, outcome))
                return
            except StoreUnavailableError as exc:
                delay = STORE_BACKOFF.delay_s(tries)
                log.error(
                    "batch_outcome_not_recorded",
                    batch_id=batch_id,
                    function=lane.fn.name,
                    error=str(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)

    async def _settle(
        self, lane: Lane, items: list[Backlogged], batch_id: str, body: bytes, outcome: Outcome
    ) -> None:
        """Record the batch and each item's outcome: final, a retry or a dead letter."""
        d, fn, now = self._d, lane.fn, time.time()
        outcomes = item_outcomes(outcome, batch_id, [item.id for item in items])
        rand = random.random()  # one jitter for the batch: its retries come due together
        decided: list[BatchItem] = []
        for item in items:
            o, attempt = outcomes[item.id], item.attempt + 1
            if o.status is Status.SUCCEEDED:
                decided.append(BatchItem(item.id, attempt, o))
                continue
            verdict = after_failure(
                fn,
                attempt=attempt,
                retry_base=item.retry_base,
                age_from=item.age_from,
                now=now,
                rand=lambda: rand,
            )
            decided.append(
                BatchItem(item.id, attempt, o, verdict.next_attempt_at, verdict.dead_letter)
            )
        record = NewInvocation(
            id=batch_id,
            function=fn.name,
            function_version=items[0].version,
            trigger=TRIGGER,
            trigger_id=items[0].trigger_id,
            invocation_type="async",
            event=body,
            queued_at=outcome.started_at,
            attempt=1,
        )
        route = d._router if fn.on_success or fn.on_failure else None
        settled = await d._store.settle_batch(record, outcome, decided, route)
        self._after(lane, items, decided, settled, batch_id)

    def _after(
        self,
        lane: Lane,
        items: list[Backlogged],
        decided: list[BatchItem],
        settled: list[Any],
        batch_id: str,
    ) -> None:
        d, fn = self._d, lane.fn
        retries: dict[float, list[Backlogged]] = {}
        for item, done, final in zip(items, decided, settled, strict=True):
            if final is None:
                assert done.next_attempt_at is not None
                retried = msgspec.structs.replace(item, attempt=done.attempt)
                retries.setdefault(done.next_attempt_at, []).append(retried)
                lane.counts.retries += 1
            elif done.dead_letter is not None:
                d._dead_lettered(lane, item, done.attempt, final.status, done.dead_letter)
                d._routed(final.routed)
            else:
                lane.counts.finish(item.trigger, final.status)
                d._resolve_final(item.id, final.status)
                d._routed(final.routed)
        failed = sum(1 for done in decided if done.outcome.status is not Status.SUCCEEDED)
        log.info(
            "batch_settled",
            batch_id=batch_id,
            function=fn.name,
            items=len(items),
            failed=failed,
            retrying=sum(len(r) for r in retries.values()),
        )
        for at, again in retries.items():
            lane.push_all_at(again, at)
