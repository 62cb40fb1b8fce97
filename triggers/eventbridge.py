"""EventBridge schedule expressions, `rate(value unit)` and `cron(min hour dom month dow year)`.

Lambda users bring these from their EventBridge rules, so a cron trigger's `schedule` takes them
as written there. They become what the cron source already runs:

- `rate(N unit)` is a `RateSchedule`: every N minutes, hours or days, counted from the Unix epoch
  (00:00 UTC), not from when the trigger was created as on AWS. Why: the fire times then do not
  depend on when the daemon started, so dedupe keys and missed-fire catch-up survive restarts.
  The unit is singular for 1 and plural above it (`rate(1 hour)`, `rate(5 hours)`), as
  EventBridge requires. Elapsed time: the trigger's `timezone` does not move rate fires.
- `cron(...)` is translated to APScheduler 3.x CronTrigger fields (`eventbridge_cron`); every
  numeric field is expanded to an explicit list, so EventBridge's `a/b` steps and wrapping ranges
  (`20-2` in hours) need nothing from APScheduler. Day-of-week is 1-7 = SUN-SAT in EventBridge
  and is handed over by name (APScheduler numbers mon=0), so no number crosses the boundary.
  `?`, `L` (last day of the month), `nL` (last weekday n of the month) and `n#k` (k-th weekday n)
  map onto APScheduler's `last`, `last fri` and `2nd tue` day expressions. `W` (nearest weekday)
  and `L-n` offsets have no APScheduler equivalent and are refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

RATE = re.compile(r"(\d+)\s+([a-z]+)", re.IGNORECASE)
RATE_UNITS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_RATE = timedelta(days=36500)  # a century: longer periods overflow datetime's years
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")  # EventBridge 1-7
POSITIONS = ("1st", "2nd", "3rd", "4th", "5th")  # APScheduler's words for `#1` .. `#5`
_ITEM = re.compile(r"(\*|\w+)(?:-(\w+))?(?:/(\d+))?")


@dataclass(frozen=True)
class RateSchedule:
    """`rate(N unit)`: fires at every multiple of `period` since the Unix epoch."""

    expression: str
    period: timedelta

    def next_after(self, after: datetime) -> datetime:
        return EPOCH + ((after - EPOCH) // self.period + 1) * self.period


def parse_rate(inner: str, expression: str) -> RateSchedule:
    """The inside of `rate(...)`; ValueError names the part EventBridge would refuse."""
    match = RATE.fullmatch(inner.strip())
    if match is None:
        raise ValueError(f"{inner!r}: expected a whole number and a unit, as in rate(5 minutes)")
    value, unit = int(match[1]), match[2].lower()
    singular = unit.removesuffix("s")
    if singular not in RATE_UNITS:
        raise ValueError(f"unit {unit!r}: use minute(s), hour(s) or day(s)")
    if value < 1:
        raise ValueError(f"value {value}: must be 1 or more")
    if (value == 1) != (unit == singular):
        wanted = singular if value == 1 else f"{singular}s"
        raise ValueError(f"unit {unit!r} with value {value}: EventBridge wants {wanted!r}")
    if value > MAX_RATE // RATE_UNITS[singular]:
        raise ValueError(f"value {value}: a period longer than {MAX_RATE.days} days")
    return RateSchedule(expression, value * RATE_UNITS[singular])


@dataclass(frozen=True)
class CronFields:
    """An EventBridge cron expression as APScheduler CronTrigger keyword sets (any match fires)."""

    parts: tuple[dict[str, str], ...]
    fixed_time: bool  # no `*` or `/` in minute or hour: a wall-clock schedule (see triggers.cron)


def eventbridge_cron(inner: str) -> CronFields:
    """The inside of `cron(...)`; ValueError names the field and the part that is unsupported."""
    fields = inner.upper().split()
    if len(fields) != 6:
        raise ValueError(
            "expected 6 fields (minutes hours day-of-month month day-of-week year),"
            f" got {len(fields)}"
        )
    minute, hour, dom, month, dow, year = fields
    if (dom == "?") == (dow == "?"):
        raise ValueError(
            f"day-of-month {dom!r} and day-of-week {dow!r}: exactly one of them must be '?'"
        )
    common = {
        "second": "0",
        "minute": _expand("minutes", minute, 0, 59),
        "hour": _expand("hours", hour, 0, 23),
        "month": _expand("month", month, 1, 12, MONTHS),
        "year": _expand("year", year, 1970, 2199),
    }
    if dow == "?":
        days = [{"day": _day_of_month(dom), "day_of_week": "*"}]
    else:
        days = _day_of_week(dow)
    fixed_time = not any(c in f for f in (minute, hour) for c in "*/")
    return CronFields(tuple(common | d for d in days), fixed_time)


def _day_of_month(field: str) -> str:
    """Day-of-month for APScheduler's `day`: numbers, and `L` as its `last`."""
    values, last = [], False
    for item in field.split(","):
        if item == "L":
            last = True
        elif "W" in item:
            raise ValueError(
                f"day-of-month field {field!r}: {item!r} (W, the nearest weekday) is not"
                " supported: APScheduler's CronTrigger cannot express it"
            )
        elif item.startswith("L"):
            raise ValueError(
                f"day-of-month field {field!r}: {item!r} (an offset from the last day) is not"
                " supported: APScheduler's CronTrigger cannot express it"
            )
        else:
            values.append(_expand("day-of-month", item, 1, 31))
    if "*" in values:
        return "*"
    return ",".join([*values, "last"] if last else values)


def _day_of_week(field: str) -> list[dict[str, str]]:
    """Day-of-week (1-7 = SUN-SAT) as keyword sets: plain days by name, `nL` and `n#k` as days
    of the month (APScheduler puts "last fri" and "2nd tue" in its `day` field)."""
    numbers: set[int] = set()
    positional: list[str] = []
    if field.count("#") > 1:
        raise ValueError(f"day-of-week field {field!r}: only one '#' term is allowed")
    for item in field.split(","):
        if item == "L":
            raise ValueError(
                f"day-of-week field {field!r}: 'L' alone is not supported; write 7 (SAT), or"
                " nL for the last weekday n of the month (6L = last Friday)"
            )
        if item.endswith("L"):
            positional.append(f"last {_weekday_name(field, item[:-1])}")
        elif "#" in item:
            day, _, nth = item.partition("#")
            if nth not in ("1", "2", "3", "4", "5"):
                raise ValueError(f"day-of-week field {field!r}: {item!r}: '#' takes 1 to 5")
            positional.append(f"{POSITIONS[int(nth) - 1]} {_weekday_name(field, day)}")
        else:
            text = _expand("day-of-week", item, 1, 7, WEEKDAYS)
            numbers.update(range(1, 8) if text == "*" else map(int, text.split(",")))
    parts = [{"day": p, "day_of_week": "*"} for p in positional]
    if numbers:
        days = "*" if len(numbers) == 7 else _weekday_names(numbers)
        parts.insert(0, {"day": "*", "day_of_week": days})
    return parts


def _weekday_names(numbers: set[int]) -> str:
    return ",".join(WEEKDAYS[n - 1].lower() for n in sorted(numbers))


def _weekday_name(field: str, token: str) -> str:
    number = _value("day-of-week", field, token, 1, 7, WEEKDAYS)
    return WEEKDAYS[number - 1].lower()


def _expand(name: str, field: str, lo: int, hi: int, names: tuple[str, ...] = ()) -> str:
    """A numeric field as an explicit comma list (or `*`): steps and wrapping ranges resolved."""
    if field == "*":
        return "*"
    values: set[int] = set()
    for item in field.split(","):
        match = _ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"{name} field {field!r}: cannot read {item!r}")
        first, last, step = match.groups()
        start = lo if first == "*" else _value(name, field, first, lo, hi, names)
        if first == "*" and last is not None:
            raise ValueError(f"{name} field {field!r}: cannot read {item!r}")
        end = hi if last is None and (step or first == "*") else start
        if last is not None:
            end = _value(name, field, last, lo, hi, names)
        run = (
            list(range(start, end + 1))
            if start <= end
            else [
                *range(start, hi + 1),
                *range(lo, end + 1),
            ]
        )  # EventBridge ranges may wrap: hours 20-2
        every = int(step or 1)
        if every == 0:
            raise ValueError(f"{name} field {field!r}: {item!r} has a step of 0")
        values.update(run[::every])
    return ",".join(map(str, sorted(values)))


def _value(name: str, field: str, token: str, lo: int, hi: int, names: tuple[str, ...]) -> int:
    if token in names:
        return names.index(token) + 1
    if token.isdigit() and lo <= int(token) <= hi:
        return int(token)
    allowed = f"{lo}-{hi}" + (f" or {names[0]}-{names[-1]}" if names else "")
    raise ValueError(f"{name} field {field!r}: {token!r} is not {allowed}")
