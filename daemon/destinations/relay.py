"""Delivers the outbox's mqtt: and webhook: destination records (routing.py writes them).

Store and forward: a record stays in the outbox until its target has acknowledged it (the
broker's PUBACK at QoS 1, an HTTP 2xx), so a target that is away for a day gets everything
when it is back, across restarts. Records go by channel (the MQTT broker, or one webhook URL),
oldest first. A channel that does not answer (unreachable, no PUBACK, a timeout, HTTP 5xx, 408
or 429) is retried with capped, jittered backoff, and its other records wait behind it instead
of hammering it; other channels go on meanwhile. A refusal is permanent (another webhook 4xx,
a redirect, a broker's negative PUBACK): that record is kept as `failed`, logged as an error,
and the rest of its channel goes on.

At least once: a crash between the acknowledgement and the delete sends a record again. Every
delivery of a record carries the same key (the `Idempotency-Key` header, the MQTT `message-id`
user property) so a receiver can drop a repeat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # paho loads only once an mqtt: destination has a record to send
    from daemon.destinations.mqtt import MqttPublisher

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import msgspec
import structlog

from daemon.backoff import Backoff
from daemon.config import Config
from daemon.errors import MqttPublishError
from daemon.store.outbox import OutboxRow
from daemon.store.sqlite import Store

log = structlog.get_logger("lambdaemon.destinations")

BATCH = 200  # records read per look at the outbox
BACKOFF_S = (0.5, 60.0)  # a failing channel's first delay and cap: a returning target waits <1 min
MAX_RETRY_AFTER_S = 3600.0  # the most a target's Retry-After header may hold a channel back
WEBHOOK_TIMEOUT_S = 10.0
STORE_RETRY_S = 5.0  # after the outbox could not be read
_STREAMED_BYTES = 512 * 1024  # larger bodies go as a stream (aiohttp warns about big bytes)
# Jitter only lengthens the delay, so channels that failed together spread out.
_CHANNEL_BACKOFF = Backoff(*BACKOFF_S, jitter=(1.0, 1.5))


class _Retry(Exception):
    """The target did not take the record now; try the channel again later."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _Refused(Exception):
    """The target refused the record for good."""


class _Hold(msgspec.Struct, frozen=True):
    failures: int
    until: float  # time.monotonic()


class OutboxRelay:
    """Sends pending outbox records to their targets until stopped; see the module doc."""

    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store
        self._wake = asyncio.Event()
        self._looked_at = 0.0
        self._blocked: dict[str, _Hold] = {}  # channel -> its backoff after a failure
        self._session: aiohttp.ClientSession | None = None
        self._publisher: MqttPublisher | None = None  # connected on the first mqtt: record
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: Config, store: Store) -> AsyncIterator[OutboxRelay]:
        """Deliver while the block runs; on exit stop (what is pending waits for the next start)."""
        relay = cls(config, store)
        counts = await store.count_outbox()
        log.info("outbox_opened", pending=counts.get("pending", 0), failed=counts.get("failed", 0))
        relay._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S),
            headers={"User-Agent": "lambdaemon"},
        )
        relay._spawn(relay.run(), "outbox-relay")
        try:
            yield relay
        finally:
            await relay._close()

    def wake(self) -> None:
        """A record has joined the outbox: look now."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled."""
        while True:
            self._wake.clear()  # before the look: a record added during it wakes the next sleep
            try:
                if await self._deliver_due():
                    continue
            except Exception as exc:  # a store hiccup must not end delivery for good
                log.error("outbox_relay_failed", error=repr(exc), retry_in_s=STORE_RETRY_S)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            await self._sleep()

    # --- one look at the outbox ---------------------------------------------------------------

    async def _deliver_due(self) -> bool:
        now = self._looked_at = time.monotonic()
        blocked = [channel for channel, b in self._blocked.items() if b.until > now]
        found = await self._store.load_due_outbox(blocked, BATCH)
        if not found:
            return False
        channels: dict[str, list[OutboxRow]] = {}
        for row in found:
            channels.setdefault(row.channel, []).append(row)
        writes: list[asyncio.Future[Any]] = []
        await asyncio.gather(*(self._deliver(rows, writes) for rows in channels.values()))
        # Committed before the next look, so a delivered record is never read as pending again.
        for result in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("outbox_write_failed", error=repr(result))
        return True

    async def _deliver(self, rows: list[OutboxRow], writes: list[asyncio.Future[Any]]) -> None:
        """One channel's records in order; stop at the first that must wait."""
        for row in rows:
            bound = log.bind(
                outbox_id=row.id,
                invocation_id=row.invocation_id,
                kind=row.kind,
                target=row.target,
                attempt=row.attempts + 1,
            )
            try:
                await self._send(row)
            except _Refused as exc:
                writes.append(
                    _spawned(
                        self._store.record_delivery_failure(
                            row.id, str(exc), time.time(), final=True
                        )
                    )
                )
                bound.error("destination_failed", error=str(exc))
                continue
            except Exception as exc:
                retry = exc if isinstance(exc, _Retry) else _Retry(repr(exc))
                delay_s = self._hold(row.channel, retry.retry_after_s)
                writes.append(
                    _spawned(
                        self._store.record_delivery_failure(
                            row.id, str(retry), time.time(), final=False
                        )
                    )
                )
                bound.warning("destination_retry", error=str(retry), retry_in_s=round(delay_s, 2))
                return
            self._blocked.pop(row.channel, None)
            writes.append(_spawned(self._store.delete_delivered(row.id)))
            bound.info("destination_delivered")

    def _hold(self, channel: str, retry_after_s: float | None) -> float:
        """Back the channel off after a failure; return the delay."""
        failures = self._blocked[channel].failures + 1 if channel in self._blocked else 1
        delay_s = _CHANNEL_BACKOFF.delay_s(failures - 1)
        if retry_after_s is not None:
            delay_s = max(delay_s, min(retry_after_s, MAX_RETRY_AFTER_S))
        self._blocked[channel] = _Hold(failures, time.monotonic() + delay_s)
        return delay_s

    async def _sleep(self) -> None:
        now = time.monotonic()
        # Every hold the last look left out, even one that ran out during that look (timers may
        # fire a little early): dropping it would sleep without a timeout and never retry it.
        waits = [b.until - now for b in self._blocked.values() if b.until > self._looked_at]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(waits)) if waits else None):
                await self._wake.wait()

    # --- the targets ------------------------------------------------------------------------

    async def _send(self, row: OutboxRow) -> None:
        if row.kind == "mqtt":
            try:
                await self._mqtt().publish(row.target, row.record, message_id=row.idempotency_key)
            except MqttPublishError as exc:
                raise (_Refused if exc.permanent else _Retry)(str(exc)) from exc
        else:
            await self._post(row)

    def _mqtt(self) -> MqttPublisher:
        if self._publisher is None:
            if self._config.mqtt is None:  # the section went away after the record was made
                raise _Retry("the config has no [mqtt] section")
            from daemon.destinations.mqtt import MqttPublisher

            self._publisher = MqttPublisher(self._config, on_connected=self._mqtt_connected)
            self._spawn(self._publisher.run(), "mqtt-publisher")
        return self._publisher

    def _mqtt_connected(self) -> None:
        self._blocked.pop("mqtt", None)  # records held back for the broker go now
        self.wake()

    async def _post(self, row: OutboxRow) -> None:
        assert self._session is not None
        headers = {"Content-Type": "application/json", "Idempotency-Key": row.idempotency_key}
        body = io.BytesIO(row.record) if len(row.record) > _STREAMED_BYTES else row.record
        try:
            # Redirects are not followed: a POST turned into a GET would "deliver" nothing.
            async with self._session.post(
                row.target, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return
                detail = (await resp.content.read(200)).decode("utf-8", "replace").strip()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        reason = f"HTTP {resp.status}" + (f": {detail}" if detail else "")
        if resp.status in (408, 429) or resp.status >= 500:
            raise _Retry(reason, _seconds(resp.headers.get("Retry-After")))
        raise _Refused(reason)

    # --- plumbing ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def _spawned(write: Awaitable[None]) -> asyncio.Future[None]:
    # Started now, so the writes queue in delivery order; awaited together after the look.
    return asyncio.ensure_future(write)


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds; its HTTP-date form is left to the backoff."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
