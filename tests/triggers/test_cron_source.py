"""The cron source against a real Store on tmp_path, driven by an injected clock (no real waits)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from structlog.testing import capture_logs

from daemon.config import Config, load_config
from daemon.dispatcher import Dispatcher
from daemon.errors import StoreUnavailableError
from daemon.pool import WorkerPool
from daemon.store.sqlite import NewInvocation, Store
from triggers.base import Accepted
from triggers.cron import MAX_SLEEP_S, CronSource, CronTriggerConfig


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class FakeClock:
    """Wall time that moves only when the test moves it; sleepers wake at their exact deadline."""

    def __init__(self, now: datetime) -> None:
        self.t = now
        self.sleepers: list[tuple[datetime, asyncio.Future[None]]] = []
        self._slept = asyncio.Event()

    def now(self) -> datetime:
        return self.t

    async def sleep_until(self, when: datetime) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sleepers.append((when, future))
        self._slept.set()
        await future

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.t + timedelta(seconds=seconds))

    async def idle(self, sleepers: int = 1) -> None:
        """Return once `sleepers` tasks wait on the clock: everything due is done."""
        while len(self.sleepers) < sleepers:
            self._slept.clear()
            await self._slept.wait()

    def jump(self, to: datetime) -> None:
        """Set the time (forward or back) and wake whoever's deadline has passed."""
        self.t = to
        due = [s for s in self.sleepers if s[0] <= to]
        self.sleepers = [s for s in self.sleepers if s[0] > to]
        for _, future in due:
            future.set_result(None)

    async def advance(self, to: datetime, sleepers: int = 1) -> None:
        """Let time run to `to`, waking each sleeper exactly at its deadline on the way."""
        while True:
            await self.idle(sleepers)
            deadline = min(when for when, _ in self.sleepers)
            if deadline > to:
                self.t = to
                return
            self.jump(deadline)


class StoreEmit:
    """The dispatcher's intake minus the pool: Store.insert, after `failures` failures."""

    def __init__(self, store: Store, failures: int = 0) -> None:
        self.store = store
        self.failures = failures
        self.calls: list[str] = []

    async def __call__(
        self,
        function: str,
        event: Any,
        *,
        trigger: str,
        trigger_id: str,
        dedupe_key: str | None = None,
        cron_fire: tuple[str, str] | None = None,
    ) -> Accepted:
        self.calls.append(str(dedupe_key))
        if self.failures:
            self.failures -= 1
            raise StoreUnavailableError("disk is gone")
        inv = NewInvocation(
            id=uuid.uuid4().hex,
            function=function,
            function_version="$LATEST",
            trigger=trigger,
            invocation_type="async",
            event=event if isinstance(event, bytes) else json.dumps(event).encode(),
            queued_at=time.time(),
            trigger_id=trigger_id,
            dedupe_key=dedupe_key,
        )
        invocation_id, created = await self.store.insert(inv, cron_fire=cron_fire)
        return Accepted(invocation_id=invocation_id, created=created)


def cron(schedule: str, **kw: Any) -> list[tuple[str, str, CronTriggerConfig]]:
    return [("report", "report#0", CronTriggerConfig(schedule=schedule, **kw))]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "lambdaemon.db") as opened:
        yield opened


@contextlib.asynccontextmanager
async def running(
    store: Store, clock: FakeClock, triggers: list, emit: Any = None, config: Config | None = None
) -> AsyncIterator[Any]:
    emit = emit or StoreEmit(store)
    task = asyncio.create_task(CronSource(config, store, triggers, clock=clock).run(emit))
    try:
        async with asyncio.timeout(10):
            await clock.idle(len(triggers))
        yield emit
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        clock.sleepers.clear()  # the cancelled source's


async def fired(store: Store) -> list[str]:
    """Nominal times of the committed cron invocations, in order."""
    rows = await store.query(
        "SELECT event FROM invocations WHERE trigger = 'cron' ORDER BY queued_at"
    )
    return [json.loads(r["event"])["time"] for r in rows]


async def marker(store: Store, trigger_id: str = "report#0") -> str | None:
    rows = await store.query(
        "SELECT last_nominal FROM cron_fires WHERE trigger_id = ?", (trigger_id,)
    )
    return rows[0][0] if rows else None


async def test_cron_fire_commits_one_invocation_and_its_marker(store):
    clock = FakeClock(utc("2025-06-01T11:58:10Z"))
    with capture_logs() as logs:
        async with running(store, clock, cron("*/5 * * * *")):
            async with asyncio.timeout(10):
                await clock.advance(utc("2025-06-01T12:02:00Z"))
    rows = await store.query(
        "SELECT function, trigger, trigger_id, dedupe_key, status, event FROM invocations"
    )
    assert len(rows) == 1
    row = dict(rows[0])
    event = json.loads(row.pop("event"))
    assert row == {
        "function": "report",
        "trigger": "cron",
        "trigger_id": "report#0",
        "dedupe_key": "cron:report#0@2025-06-01T12:00:00Z",
        "status": "queued",
    }
    assert event["time"] == "2025-06-01T12:00:00Z" and event["detail-type"] == "Scheduled Event"
    assert event["resources"] == ["arn:aws:events:us-east-1:000000000000:rule/report#0"]
    assert await marker(store) == "2025-06-01T12:00:00Z"
    [log] = [e for e in logs if e["event"] == "cron_fired"]
    assert log["nominal"] == "2025-06-01T12:00:00Z" and log["delay_ms"] == 0 and log["created"]


async def test_cron_sleeps_until_the_fire_but_never_longer_than_the_cap(store):
    clock = FakeClock(utc("2025-06-01T11:00:00Z"))
    async with running(store, clock, cron("0 12 * * *")):
        assert [w for w, _ in clock.sleepers] == [clock.t + timedelta(seconds=MAX_SLEEP_S)]
        async with asyncio.timeout(10):
            await clock.advance(utc("2025-06-01T11:59:45Z"))
            assert [w for w, _ in clock.sleepers] == [utc("2025-06-01T12:00:00Z")]
            await clock.advance(utc("2025-06-01T12:00:10Z"))
    assert await fired(store) == ["2025-06-01T12:00:00Z"]


async def test_cron_first_start_does_not_catch_up(store):
    clock = FakeClock(utc("2025-06-01T12:02:30Z"))
    async with running(store, clock, cron("*/5 * * * *", missed="run_all")):
        pass
    assert await fired(store) == []
    assert await marker(store) == "2025-06-01T12:02:30Z"  # watched from here on


async def test_cron_restart_does_not_fire_the_same_nominal_time_twice(store):
    clock = FakeClock(utc("2025-06-01T11:59:00Z"))
    async with running(store, clock, cron("*/5 * * * *")):
        async with asyncio.timeout(10):
            await clock.advance(utc("2025-06-01T12:00:00Z"))
            await clock.idle()
    assert await fired(store) == ["2025-06-01T12:00:00Z"]
    # Restarted in the same second, and again after the clock went back a minute (NTP).
    for restart_at in ("2025-06-01T12:00:00Z", "2025-06-01T11:59:00Z"):
        clock.jump(utc(restart_at))
        async with running(store, clock, cron("*/5 * * * *")) as emit:
            async with asyncio.timeout(10):
                await clock.advance(utc("2025-06-01T12:04:59Z"))
        assert await fired(store) == ["2025-06-01T12:00:00Z"]
    assert emit.calls == ["cron:report#0@2025-06-01T12:00:00Z"]  # re-offered, deduplicated
    clock.jump(utc("2025-06-01T12:04:00Z"))
    async with running(store, clock, cron("*/5 * * * *")):
        async with asyncio.timeout(10):
            await clock.advance(utc("2025-06-01T12:05:30Z"))
    assert await fired(store) == ["2025-06-01T12:00:00Z", "2025-06-01T12:05:00Z"]


# Down from just after the 12:00 fire until 12:31:30: 12:05 ... 12:30 fell in the downtime.
@pytest.mark.parametrize(
    ("missed", "grace_s", "expected", "skipped"),
    [
        ("skip", 3600, [], 6),
        ("run_once", 3600, ["12:30"], 5),
        ("run_once", 60, [], 6),
        ("run_all", 3600, ["12:05", "12:10", "12:15", "12:20", "12:25", "12:30"], 0),
        ("run_all", 700, ["12:20", "12:25", "12:30"], 3),
    ],
)
async def test_cron_catch_up_after_downtime_follows_the_policy(
    store, missed, grace_s, expected, skipped
):
    triggers = cron("*/5 * * * *", missed=missed, grace_s=grace_s)
    clock = FakeClock(utc("2025-06-01T11:59:00Z"))
    async with running(store, clock, triggers):
        async with asyncio.timeout(10):
            await clock.advance(utc("2025-06-01T12:00:30Z"))
    clock.jump(utc("2025-06-01T12:31:30Z"))
    with capture_logs() as logs:
        async with running(store, clock, triggers):
            async with asyncio.timeout(10):
                await clock.advance(utc("2025-06-01T12:35:00Z"))
    times = [f"2025-06-01T{t}:00Z" for t in ["12:00", *expected, "12:35"]]
    assert await fired(store) == times
    assert await marker(store) == times[-1]
    skips = [e["skipped"] for e in logs if e["event"] == "cron_missed_skipped"]
    assert skips == ([skipped] if skipped else [])
    catch_up = [e["fires"] for e in logs if e["event"] == "cron_catch_up"]
    assert catch_up == ([len(expected)] if expected else [])


async def test_cron_downtime_before_the_first_fire_is_caught_up(store):
    triggers = cron("0 12 * * *", missed="run_once")
    clock = FakeClock(utc("2025-06-01T11:00:00Z"))
    async with running(store, clock, triggers):
        pass
    clock.jump(utc("2025-06-01T12:20:00Z"))
    async with running(store, clock, triggers):
        pass
    assert await fired(store) == ["2025-06-01T12:00:00Z"]


async def test_cron_clock_jump_forward_while_running_follows_the_policy(store):
    clock = FakeClock(utc("2025-06-01T12:01:00Z"))
    with capture_logs() as logs:
        async with running(store, clock, cron("*/5 * * * *", missed="run_once")):
            clock.jump(utc("2025-06-01T14:03:00Z"))  # NTP sync after a boot without RTC
            async with asyncio.timeout(10):
                await clock.advance(utc("2025-06-01T14:05:00Z"))
    assert await fired(store) == ["2025-06-01T14:00:00Z", "2025-06-01T14:05:00Z"]
    assert [e["skipped"] for e in logs if e["event"] == "cron_missed_skipped"] == [23]


async def test_cron_failed_commit_retries_the_same_fire_and_never_skips_it(store):
    clock = FakeClock(utc("2025-06-01T11:59:50Z"))
    emit = StoreEmit(store, failures=3)
    with capture_logs() as logs:
        async with running(store, clock, cron("*/5 * * * *", missed="skip"), emit):
            async with asyncio.timeout(10):
                await clock.advance(utc("2025-06-01T12:00:00Z"))
                assert await marker(store) == "2025-06-01T11:59:50Z"  # not marked while failing
                await clock.advance(utc("2025-06-01T12:05:00Z"))
    assert emit.calls == ["cron:report#0@2025-06-01T12:00:00Z"] * 4 + [
        "cron:report#0@2025-06-01T12:05:00Z"
    ]
    assert await fired(store) == ["2025-06-01T12:00:00Z", "2025-06-01T12:05:00Z"]
    failures = [e for e in logs if e["event"] == "cron_fire_failed"]
    assert [e["retry_in_s"] for e in failures] == [0.5, 1.0, 2.0]
    assert {e["nominal"] for e in failures} == {"2025-06-01T12:00:00Z"}


async def test_cron_fire_whose_event_cannot_be_built_is_recorded_rejected_and_marked(
    store: Store, tmp_path: Path
):
    # No config that loads makes the Scheduled Event fail (the region is validated), so the
    # loaded one gets a region that is not valid Unicode: JSON cannot hold it.
    path = tmp_path / "lambdaemon.toml"
    path.write_text('[daemon]\ndata_dir = "var"\n')
    config = load_config(path)
    config = msgspec.structs.replace(
        config, daemon=msgspec.structs.replace(config.daemon, region="eu-\udcff")
    )
    clock = FakeClock(utc("2025-06-01T11:58:10Z"))
    emit = Dispatcher(store, WorkerPool(1), {})  # rejections never run: no function needed
    with capture_logs() as logs:
        async with running(store, clock, cron("*/5 * * * *"), emit, config):
            async with asyncio.timeout(10):
                await clock.advance(utc("2025-06-01T12:07:00Z"))
    # Each fire is recorded once as a dead letter that never ran, marked, and the trigger
    # went on to the next fire: nothing retried, nothing failed.
    assert await marker(store) == "2025-06-01T12:05:00Z"
    rows = await store.query(
        "SELECT id, status, attempt, dead_letter_reason, error_message, event, dedupe_key"
        " FROM invocations ORDER BY queued_at"
    )
    assert [r["dedupe_key"] for r in rows] == [
        "cron:report#0@2025-06-01T12:00:00Z",
        "cron:report#0@2025-06-01T12:05:00Z",
    ]
    for row, nominal in zip(rows, ("12:00", "12:05"), strict=True):
        assert (row["status"], row["attempt"]) == ("failed", 0)
        assert row["dead_letter_reason"] == "EventRejected"
        assert row["error_message"].startswith("cannot build the event: ")
        event = json.loads(row["event"])
        assert event["nominal"] == f"2025-06-01T{nominal}:00Z"
        assert base64.b64decode(event["raw"]) == f"2025-06-01T{nominal}:00Z".encode()
    fired_lines = [e for e in logs if e["event"] == "cron_fired"]
    assert [e["invocation_id"] for e in fired_lines] == [r["id"] for r in rows]
    assert [e for e in logs if e["event"] == "cron_fire_failed"] == []


async def test_cron_daily_job_fires_once_across_both_dst_nights(store):
    triggers = cron("30 2 * * *", timezone="Europe/Berlin")
    for start, end, nominal in [
        ("2025-03-29T22:00Z", "2025-03-30T03:00Z", "2025-03-30T01:00:00Z"),  # 02:30 skipped: 03:00
        ("2025-10-25T22:00Z", "2025-10-26T03:00Z", "2025-10-26T00:30:00Z"),  # 02:30 twice: first
    ]:
        clock = FakeClock(utc(start))
        async with running(store, clock, triggers):
            async with asyncio.timeout(20):
                await clock.advance(utc(end))
        assert (await fired(store))[-1] == nominal
    assert len(await fired(store)) == 2


async def test_cron_triggers_fire_independently(store):
    triggers = [
        ("report", "report#0", CronTriggerConfig(schedule="0 * * * *")),
        ("report", "report#1", CronTriggerConfig(schedule="0 14 * * *", timezone="Europe/Berlin")),
        ("other", "other#0", CronTriggerConfig(schedule="30 * * * *")),
    ]
    clock = FakeClock(utc("2025-06-01T11:50:00Z"))
    async with running(store, clock, triggers):
        async with asyncio.timeout(10):
            await clock.advance(utc("2025-06-01T12:45:00Z"), sleepers=3)
    rows = await store.query("SELECT dedupe_key FROM invocations ORDER BY dedupe_key")
    assert [r[0] for r in rows] == [
        "cron:other#0@2025-06-01T12:30:00Z",
        "cron:report#0@2025-06-01T12:00:00Z",
        "cron:report#1@2025-06-01T12:00:00Z",
    ]


async def test_cron_seconds_schedule_fires_each_second_once_and_catches_up(store):
    triggers = cron("*/2 * * * * *", missed="run_all")
    clock = FakeClock(utc("2025-06-01T12:00:00.400Z"))  # the first start's second is not a fire
    async with running(store, clock, triggers):
        async with asyncio.timeout(10):
            await clock.advance(utc("2025-06-01T12:00:05.100Z"))
    assert await marker(store) == "2025-06-01T12:00:04Z"
    clock.jump(utc("2025-06-01T12:00:11.700Z"))  # down over 06, 08 and 10
    async with running(store, clock, triggers) as emit:
        async with asyncio.timeout(10):
            await clock.advance(utc("2025-06-01T12:00:14.000Z"))
    assert await fired(store) == [f"2025-06-01T12:00:{s:02d}Z" for s in range(2, 15, 2)]
    assert emit.calls == [f"cron:report#0@2025-06-01T12:00:{s:02d}Z" for s in range(6, 15, 2)]


async def test_cron_stopped_during_a_commit_still_logs_the_fire(store):
    """A stop (shutdown, reload) that cancels the source mid-commit: the store commits the fire
    regardless, so its cron_fired line is still written; every committed fire is logged."""
    committing = asyncio.Event()

    class Committing(StoreEmit):
        async def __call__(self, *args: Any, **kwargs: Any) -> Accepted:
            committing.set()  # the write is queued before this yields: the stop lands mid-commit
            return await super().__call__(*args, **kwargs)

    clock = FakeClock(utc("2025-06-01T11:59:50Z"))
    with capture_logs() as logs:
        async with running(store, clock, cron("* * * * *"), Committing(store)):
            clock.jump(utc("2025-06-01T12:00:00Z"))
            async with asyncio.timeout(10):
                await committing.wait()
    assert await fired(store) == ["2025-06-01T12:00:00Z"]
    [line] = [e for e in logs if e["event"] == "cron_fired"]
    assert line["nominal"] == "2025-06-01T12:00:00Z" and line["created"]


@pytest.mark.parametrize(
    ("schedule", "until", "expected"),
    [
        (
            "rate(5 minutes)",
            "2025-06-01T12:10:30Z",
            ["2025-06-01T12:05:00Z", "2025-06-01T12:10:00Z"],
        ),
        (
            "cron(0/5 12 ? * 1 *)",
            "2025-06-01T12:10:30Z",
            ["2025-06-01T12:05:00Z", "2025-06-01T12:10:00Z"],
        ),
    ],
)
async def test_cron_eventbridge_schedule_fires_the_scheduled_event_shape(
    store, schedule, until, expected
):
    # 2025-06-01 is a Sunday: EventBridge day-of-week 1.
    clock = FakeClock(utc("2025-06-01T12:02:00Z"))
    async with running(store, clock, cron(schedule)):
        async with asyncio.timeout(10):
            await clock.advance(utc(until))
    assert await fired(store) == expected
    rows = await store.query("SELECT event, dedupe_key FROM invocations ORDER BY queued_at")
    event = json.loads(rows[0]["event"])
    assert event == {
        "version": "0",
        "id": event["id"],
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": "2025-06-01T12:05:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:000000000000:rule/report#0"],
        "detail": {},
    }
    assert uuid.UUID(event["id"]) and rows[0]["dedupe_key"] == "cron:report#0@2025-06-01T12:05:00Z"
    # Handlers ported from EventBridge parse it with Powertools, data class and pydantic model.
    parsed = EventBridgeEvent(event)
    assert (parsed.detail_type, parsed.source, parsed.detail) == (
        "Scheduled Event",
        "aws.events",
        {},
    )
    assert parsed.resources == event["resources"] and parsed.region == "us-east-1"
    model = parse(event=event, model=EventBridgeModel)
    assert model.time == utc("2025-06-01T12:05:00Z") and model.detail_type == "Scheduled Event"
    assert (model.account, model.id) == ("000000000000", event["id"])
