"""Cron trigger source: cron schedules, each (trigger, nominal fire time) fired exactly once.

Expressions: the standard 5 fields (minute hour day-of-month month day-of-week, firing at second
0), an @alias, or 6 fields with a leading seconds field (`*/2 * * * * *` fires every 2 seconds,
`30 0 * * * *` at 00:30 past every hour). The seconds field takes what minute takes (`*`, N,
N-M, */S, N-M/S, comma-separated; 0-59); the other five fields mean what they mean in the
5-field form, and the fixed-time rule below looks at minute and hour only.

APScheduler 3.x's CronTrigger does the calendar maths only, on naive wall-clock times, so its
own DST handling never comes into play; this module maps wall times to instants by the rule
below, runs its own loop, and commits every fire with its queued invocation (dedupe key
`cron:<trigger_id>@<nominal>` plus the `cron_fires` marker, in one transaction).

Time zones and DST (Vixie cron's rule). A schedule names wall-clock times in its `timezone`.
- Fixed-time schedules (neither the minute nor the hour field starts with `*`; @daily,
  @weekly, @monthly, @yearly) fire once per matching local time. A time skipped by the
  spring-forward jump fires at the first instant after the gap (02:30 Europe/Berlin on the last
  Sunday of March runs at 03:00 CEST; several skipped times make one fire). A time that occurs
  twice at fall-back fires on its first occurrence only.
- Wildcard schedules (`*` or `*/N` leading the minute or hour field; @hourly) follow elapsed
  time: they fire at every instant whose local time matches, so a skipped time does not occur
  and a repeated time occurs twice (`0 * * * *` fires 23 times on the short day, 25 times on the
  long one, always one hour apart).
Day of week: 0 and 7 are Sunday. When day-of-month and day-of-week are both restricted (not
starting with `*`), a day matching either fires, as in cron.

EventBridge expressions, `rate(5 minutes)` and `cron(0 12 * * ? *)`, are read by
triggers.eventbridge: an EventBridge cron becomes CronTrigger fields run by the same `Schedule`
(and the same DST rule, should its `timezone` not be UTC), a rate a `RateSchedule`. Whatever the
syntax, the event is the EventBridge "Scheduled Event" below.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from msgspec import Meta

from daemon.backoff import Backoff
from daemon.errors import ConfigError
from daemon.metrics import Sample
from triggers.base import Inputs, Placed, TriggerSettings, emit_built
from triggers.eventbridge import RateSchedule, eventbridge_cron, parse_rate

if TYPE_CHECKING:
    from daemon.config import Config
    from triggers.base import Accepted, Emit

log = structlog.get_logger("lambdaemon.triggers.cron")

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MAX_SLEEP_S = 30.0  # asyncio sleeps on the monotonic clock, cron lives on the wall clock
MAX_WALK = 1000  # fires walked per catch-up step, so a year of downtime cannot stall the loop
RETRY_S = (0.5, 30.0)  # backoff of a fire whose commit failed: first, cap
FOLD_HORIZON = timedelta(hours=3)  # longer than any DST shift
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron numbering; APScheduler's names
_NUM = r"(?:\*(?:/\d+)?|\d+(?:-\d+(?:/\d+)?)?)"
_MONTH = r"(?:\*(?:/\d+)?|(?:\d+|[a-z]{3})(?:-(?:\d+|[a-z]{3})(?:/\d+)?)?)"
_DOW_ITEM = re.compile(r"\*(?:/(\d+))?|(\w+)(?:-(\w+)(?:/(\d+))?)?")
_ID_NAMESPACE = uuid.UUID("6f1c1a52-0d3e-5d5e-9b7a-6c616d626461")

Policy = Literal["skip", "run_once", "run_all"]


class CronTriggerConfig(TriggerSettings, tag="cron", frozen=True):
    schedule: str
    timezone: str = "UTC"
    missed: Policy = "run_once"
    grace_s: Annotated[float, Meta(ge=0)] = 3600.0

    def check(self, config: Config, key: str) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            reason = f"unknown time zone {self.timezone!r}"
            raise ConfigError(config.path, f"{key}.timezone", reason) from None
        try:
            parse_schedule(self.schedule, self.timezone)
        except ValueError as exc:
            reason = f"{self.schedule!r}: {exc}"
            raise ConfigError(config.path, f"{key}.schedule", reason) from None


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; `next_after(instant)` is the next fire instant by the module's rule."""

    expression: str
    zone: ZoneInfo
    fixed_time: bool  # wall-clock rule; False: a wildcard schedule that follows elapsed time
    triggers: tuple[CronTrigger, ...]  # on naive wall times posing as UTC; any match fires

    def next_after(self, after: datetime) -> datetime | None:
        wall, best = self._start_wall(after), None
        for _ in range(100_000):
            found = self._next_wall(wall)
            if found is None:
                return best
            wall = found
            instants, ambiguous = self._instants(wall)
            later = [i for i in instants if i > after]
            if later and (best is None or later[0] < best):
                best = later[0]
            # In a repeated hour a later wall time can still map to an earlier instant.
            if best is not None and not (ambiguous and not self.fixed_time):
                return best
        return best

    def _start_wall(self, after: datetime) -> datetime:
        # Just before a fall-back, wall times up to one shift back still have instants to come.
        local = after.astimezone(self.zone)
        shift = local.utcoffset() - (after + FOLD_HORIZON).astimezone(self.zone).utcoffset()  # type: ignore[operator]
        return local.replace(tzinfo=None) - max(shift, timedelta(0))

    def _next_wall(self, wall: datetime) -> datetime | None:
        probe = wall.replace(tzinfo=UTC) + timedelta(microseconds=1)  # strictly after `wall`
        found = [f for t in self.triggers if (f := t.get_next_fire_time(None, probe)) is not None]
        return min(found).replace(tzinfo=None) if found else None

    def _instants(self, wall: datetime) -> tuple[list[datetime], bool]:
        first = wall.replace(tzinfo=self.zone).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second:
            return [first], False
        if first < second:  # the wall time occurs twice (fall-back)
            return ([first] if self.fixed_time else [first, second]), True
        # A gap (spring-forward): fold=1 lands before the jump and fold=0 after it.
        return ([_gap_end(self.zone, second, first)] if self.fixed_time else []), False


def _gap_end(zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The first instant after a DST gap, found between an instant before and one after it."""
    offset = before.astimezone(zone).utcoffset()
    while after - before > timedelta(seconds=1):
        middle = before + timedelta(seconds=(after - before).total_seconds() // 2)
        if middle.astimezone(zone).utcoffset() == offset:
            before = middle
        else:
            after = middle
    return after


class Timetable(Protocol):
    """What the source asks of a parsed schedule, cron-like or rate."""

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire instant strictly after `after`, or None if it never fires again."""
        ...


def parse_schedule(schedule: str, timezone: str = "UTC") -> Schedule | RateSchedule:
    """Parse `rate(...)`, `cron(...)` (EventBridge), or a 5- or 6-field cron expression or
    @alias, in `timezone`; the ValueError names the syntax tried and what it refused."""
    text = schedule.strip()
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    form, inner = _wrapped(text)
    try:
        if form == "rate":
            return parse_rate(inner, text)
        if form == "cron":
            cron = eventbridge_cron(inner)
            return _schedule(text, zone, cron.fixed_time, cron.parts)
        return _parse_crontab(text, zone)
    except ValueError as exc:
        raise ValueError(f"{SYNTAX[form]}: {exc}") from None


SYNTAX = {
    "rate": "EventBridge rate(value unit) syntax",
    "cron": "EventBridge cron(minutes hours day-of-month month day-of-week year) syntax",
    "": "crontab syntax (5 fields, 6 with seconds first, or an @alias)",
}


def _wrapped(text: str) -> tuple[str, str]:
    """("rate" or "cron", the inside) for an EventBridge expression, else ("", text)."""
    match = re.fullmatch(r"(rate|cron)\s*\((.*)\)", text, re.IGNORECASE | re.DOTALL)
    if match is None:
        return "", text
    return match[1].lower(), match[2]


def _schedule(
    expression: str, zone: ZoneInfo, fixed_time: bool, parts: tuple[dict[str, str], ...]
) -> Schedule:
    triggers = tuple(CronTrigger(**part, timezone=UTC) for part in parts)
    parsed = Schedule(expression, zone, fixed_time, triggers)
    if parsed._next_wall(datetime(2000, 1, 1)) is None:
        raise ValueError("never fires: no date matches its day-of-month and month")
    return parsed


def _parse_crontab(text: str, zone: ZoneInfo) -> Schedule:
    expression = ALIASES.get(text.lower(), text)
    if expression.startswith("@"):
        raise ValueError(f"unknown alias; use 5 or 6 fields or one of {', '.join(ALIASES)}")
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (second"
            f" minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    second, minute, hour, day, month, dow = fields if len(fields) == 6 else ["0", *fields]
    if "?" in expression:
        raise ValueError("'?' is EventBridge syntax: write cron(minutes ... year) around it")
    checks = (
        ("second", second, _NUM),
        ("minute", minute, _NUM),
        ("hour", hour, _NUM),
        ("day-of-month", day, _NUM),
        ("month", month, _MONTH),
    )
    for name, value, item in checks:
        if not re.fullmatch(f"{item}(?:,{item})*", value, re.IGNORECASE):
            raise ValueError(
                f"{name} field {value!r}: use *, N, N-M, */S or N-M/S, comma-separated"
            )
        try:
            CronTrigger(**{name.replace("-of-month", ""): value}, timezone=UTC)
        except ValueError as exc:
            reason = re.sub(r"^Error validating expression '[^']*': ", "", str(exc))
            raise ValueError(f"{name} field {value!r}: {reason}") from None
    days = _weekdays(dow)
    common = {"second": second, "minute": minute, "hour": hour, "month": month.lower()}
    parts: tuple[dict[str, str], ...] = ({"day": day, "day_of_week": days},)
    if day[0] != "*" and dow[0] != "*":  # cron fires on a day matching either field
        parts = ({"day": day, "day_of_week": "*"}, {"day": "*", "day_of_week": days})
    fixed_time = minute[0] != "*" and hour[0] != "*"
    return _schedule(expression, zone, fixed_time, tuple(common | part for part in parts))


def _weekdays(field: str) -> str:
    """Cron's day-of-week field (0 and 7 = Sunday, names) as APScheduler day names."""
    days: set[int] = set()
    for item in field.lower().split(","):
        match = _DOW_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"day-of-week field {field!r}: cannot read {item!r}")
        star_step, first, last, step = match.groups()
        lo, hi = (0, 7) if first is None else (_day(field, first), _day(field, last or first))
        step_n = int(star_step or step or 1)
        if step_n == 0 or lo > hi:
            raise ValueError(f"day-of-week field {field!r}: {item!r} is an empty range")
        days.update(d % 7 for d in range(lo, hi + 1, step_n))
    return "*" if len(days) == 7 else ",".join(_DAYS[d] for d in sorted(days))


def _day(field: str, token: str) -> int:
    if token.isdigit() and int(token) <= 7:
        return int(token)
    if token in _DAYS:
        return _DAYS.index(token)
    raise ValueError(f"day-of-week field {field!r}: {token!r} is not 0-7 or sun-sat")


# --- missed fires ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MissedPlan:
    """What to do with fires that came due unseen: `run` now, and how many were given up."""

    run: list[datetime]
    skipped: int
    capped: bool  # `skipped` is a lower bound
    until: datetime  # every fire up to here is decided


def plan_missed(
    schedule: Timetable, after: datetime, now: datetime, policy: Policy, grace_s: float
) -> MissedPlan:
    """Apply `policy` to the fires in (after, now]; only fires no older than grace_s may run."""
    oldest = now - timedelta(seconds=grace_s)
    run: list[datetime] = []
    if policy == "run_once":
        latest = _latest_fire(schedule, after, now)
        run = [latest] if latest is not None and latest >= oldest else []
    elif policy == "run_all":
        run = _fires(schedule, max(after, oldest - timedelta(microseconds=1)), now, MAX_WALK)
    until = run[-1] if len(run) == MAX_WALK else now  # more next round: the loop comes back
    counted = _fires(schedule, after, until, MAX_WALK + len(run))
    skipped = len(counted) - len(run)
    return MissedPlan(run, skipped, len(counted) == MAX_WALK + len(run), until)


def _fires(schedule: Timetable, after: datetime, until: datetime, limit: int) -> list[datetime]:
    fires: list[datetime] = []
    while len(fires) < limit:
        fire = schedule.next_after(fires[-1] if fires else after)
        if fire is None or fire > until:
            break
        fires.append(fire)
    return fires


def _latest_fire(schedule: Timetable, after: datetime, now: datetime) -> datetime | None:
    # Widen the look-back until it holds a fire: cost grows with the log of the downtime.
    span = timedelta(minutes=1)
    while True:
        start = max(after, now - span)
        fires = _fires(schedule, start, now, 100_000)
        if fires or start == after:
            return fires[-1] if fires else None
        span *= 4


def scheduled_event(trigger_id: str, nominal: datetime, region: str) -> dict[str, Any]:
    """Lambda's EventBridge "Scheduled Event" for one fire; its id is stable per fire."""
    return {
        "version": "0",
        "id": str(uuid.uuid5(_ID_NAMESPACE, dedupe_key(trigger_id, nominal))),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": iso(nominal),
        "region": region,
        "resources": [f"arn:aws:events:{region}:000000000000:rule/{trigger_id}"],
        "detail": {},
    }


def iso(instant: datetime) -> str:
    """RFC 3339 UTC, whole seconds; fixed width, so the text sorts like the time."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dedupe_key(trigger_id: str, nominal: datetime) -> str:
    return f"cron:{trigger_id}@{iso(nominal)}"


# --- the source --------------------------------------------------------------------------------


class Clock(Protocol):
    """Wall-clock time for the cron loop; tests inject one that only moves when told."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    async def sleep_until(self, when: datetime) -> None: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        await asyncio.sleep(max(0.0, (when - self.now()).total_seconds()))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class _Trigger:
    function: str
    trigger_id: str
    config: CronTriggerConfig
    schedule: Timetable


class CronSource:
    """Fires every cron trigger of the config (`config` may be None: region us-east-1)."""

    name = "cron"
    settings = CronTriggerConfig

    def __init__(
        self,
        config: Config | None,
        store: Any,
        triggers: list[tuple[str, str, CronTriggerConfig]],
        *,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._region = config.daemon.region if config is not None else "us-east-1"
        self._clock = clock or SystemClock()
        self._triggers = [
            _Trigger(fn, tid, cfg, parse_schedule(cfg.schedule, cfg.timezone))
            for fn, tid, cfg in triggers
        ]
        self.started = asyncio.Event()
        self._last_fire: dict[str, float] = {}  # trigger id -> nominal time of its last fire

    def samples(self) -> list[Sample]:
        name = "lambdaemon_cron_last_fire_timestamp_seconds"
        return [
            Sample(name, {"function": t.function, "trigger": t.trigger_id}, at)
            for t in self._triggers
            if (at := self._last_fire.get(t.trigger_id)) is not None
        ]

    @staticmethod
    def inputs(config: Config, triggers: list[Placed], secrets: Mapping[str, str]) -> Inputs:
        return Inputs(restart=(triggers, config.daemon.region))

    async def run(self, emit: Emit) -> None:
        self.started.set()  # nothing outside to wait for; the fire markers load meanwhile
        async with asyncio.TaskGroup() as tasks:
            for trigger in self._triggers:
                tasks.create_task(
                    self._run_trigger(emit, trigger), name=f"cron:{trigger.trigger_id}"
                )
            if not self._triggers:
                await asyncio.get_running_loop().create_future()  # nothing to do until cancelled

    async def _run_trigger(self, emit: Emit, t: _Trigger) -> None:
        after, catching_up = await self._start(t)
        while True:
            now = self._clock.now()
            first = t.schedule.next_after(after)
            if first is None:
                return  # parse_schedule rejects schedules that never fire
            if first > now:
                catching_up = False
                # Wake exactly at the fire, but recompute at least every MAX_SLEEP_S so a wall
                # clock that jumps (NTP at boot) is noticed.
                await self._clock.sleep_until(min(first, now + timedelta(seconds=MAX_SLEEP_S)))
                continue
            second = t.schedule.next_after(first)
            if catching_up or (second is not None and second <= now):
                # Downtime, or the clock jumped forward past several fires: the policy decides.
                plan = plan_missed(t.schedule, after, now, t.config.missed, t.config.grace_s)
                self._log_plan(t, plan)
                run, after = plan.run, plan.until
            else:
                run, after = [first], first
            for nominal in run:
                await self._fire(emit, t, nominal)

    async def _start(self, t: _Trigger) -> tuple[datetime, bool]:
        marked = await self._store.last_cron_fire(t.trigger_id)
        now = self._clock.now()
        if marked is None:
            # First start: nothing to catch up. Remember since when the trigger is watched, so
            # a fire missed before its first fire is still caught up after a restart.
            await self._store.mark_cron_fire(t.trigger_id, iso(now))
            log.info(
                "cron_started", trigger_id=t.trigger_id, schedule=t.config.schedule, first=True
            )
            return now, False
        last = datetime.strptime(marked, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        log.info("cron_started", trigger_id=t.trigger_id, schedule=t.config.schedule, last=marked)
        if last > now:
            # The clock went back (or was wrong when the marker was written); waiting for it
            # would stall the trigger, and dedupe keys stop an already-fired time firing twice.
            log.warning("cron_clock_behind", trigger_id=t.trigger_id, last=marked, now=iso(now))
            return now, False
        return last, True

    async def _fire(self, emit: Emit, t: _Trigger, nominal: datetime) -> None:
        delay_ms = round((self._clock.now() - nominal).total_seconds() * 1000, 1)
        backoff = Backoff(*RETRY_S)
        while True:
            # A fire whose event cannot be built is recorded as rejected (and marked), so it
            # neither stops this trigger nor is retried for ever.
            committing = asyncio.ensure_future(
                emit_built(
                    emit,
                    t.function,
                    lambda: scheduled_event(t.trigger_id, nominal, self._region),
                    raw=lambda: iso(nominal).encode(),
                    trigger="cron",
                    trigger_id=t.trigger_id,
                    dedupe_key=dedupe_key(t.trigger_id, nominal),
                    cron_fire=(t.trigger_id, iso(nominal)),
                    details=lambda: {"nominal": iso(nominal), "schedule": t.config.schedule},
                )
            )
            try:
                accepted = await asyncio.shield(committing)
                break
            except asyncio.CancelledError:
                # Stopped mid-commit: the store commits a write whose caller went away, so wait
                # for the outcome and log a fire that landed; every committed fire is logged.
                with contextlib.suppress(Exception):
                    self._log_fired(t, nominal, delay_ms, await committing)
                raise
            except Exception as exc:
                # Not marked, so not lost: the same nominal fire is retried until it commits.
                retry_s = backoff.next()
                log.error(
                    "cron_fire_failed",
                    trigger_id=t.trigger_id,
                    nominal=iso(nominal),
                    error=repr(exc),
                    retry_in_s=retry_s,
                )
                await self._clock.sleep(retry_s)
        self._log_fired(t, nominal, delay_ms, accepted)

    def _log_fired(
        self, t: _Trigger, nominal: datetime, delay_ms: float, accepted: Accepted
    ) -> None:
        self._last_fire[t.trigger_id] = nominal.timestamp()
        log.info(
            "cron_fired",
            trigger_id=t.trigger_id,
            function=t.function,
            nominal=iso(nominal),
            delay_ms=delay_ms,
            invocation_id=accepted.invocation_id,
            created=accepted.created,
        )

    def _log_plan(self, t: _Trigger, plan: MissedPlan) -> None:
        if plan.skipped:
            log.warning(
                "cron_missed_skipped",
                trigger_id=t.trigger_id,
                policy=t.config.missed,
                skipped=plan.skipped,
                capped=plan.capped,
            )
        if plan.run:
            log.info(
                "cron_catch_up",
                trigger_id=t.trigger_id,
                policy=t.config.missed,
                fires=len(plan.run),
                first=iso(plan.run[0]),
                last=iso(plan.run[-1]),
            )
