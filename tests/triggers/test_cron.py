"""Cron time maths as tables: next fires, day-of-week, aliases, time zones, DST, missed policies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from triggers.cron import MAX_WALK, parse_schedule, plan_missed, scheduled_event


def utc(text: str) -> datetime:
    """Table times are UTC; without a year they are in 2025 ("03-30T01:00")."""
    text = text.removesuffix("Z")
    return datetime.fromisoformat(text if text[4] == "-" else f"2025-{text}").replace(tzinfo=UTC)


def short(instant: datetime) -> str:
    return instant.strftime("%m-%dT%H:%M" if instant.year == 2025 else "%Y-%m-%dT%H:%M")


def fires(expression: str, tz: str, after: str, count: int) -> list[str]:
    schedule, at, out = parse_schedule(expression, tz), utc(after), []
    for _ in range(count):
        nxt = schedule.next_after(at)
        assert nxt is not None
        out.append(short(nxt))
        at = nxt
    return out


def fires_between(expression: str, tz: str, start: str, end: str) -> list[str]:
    schedule, at, out = parse_schedule(expression, tz), utc(start), []
    while (nxt := schedule.next_after(at)) is not None and nxt <= utc(end):
        out.append(short(nxt))
        at = nxt
    return out


# 2025-01-01 is a Wednesday; 2025-01-05 a Sunday.
@pytest.mark.parametrize(
    ("expression", "tz", "after", "expected"),
    [
        ("*/5 * * * *", "UTC", "01-01T12:03", ["01-01T12:05", "01-01T12:10"]),
        ("*/5 * * * *", "UTC", "01-01T12:05", ["01-01T12:10", "01-01T12:15"]),
        ("0 9-17/4 * * *", "UTC", "01-01T09:00", ["01-01T13:00", "01-01T17:00", "01-02T09:00"]),
        ("0 0 1 jan,JUL *", "UTC", "01-01T00:00", ["07-01T00:00", "2026-01-01T00:00"]),
        ("0 0 29 2 *", "UTC", "01-01T00:00", ["2028-02-29T00:00"]),
        # Day of week: cron numbering, 0 and 7 are Sunday (APScheduler's 0 is Monday).
        ("0 0 * * 0", "UTC", "01-01T00:00", ["01-05T00:00", "01-12T00:00"]),
        ("0 0 * * 7", "UTC", "01-01T00:00", ["01-05T00:00", "01-12T00:00"]),
        ("0 0 * * sun", "UTC", "01-01T00:00", ["01-05T00:00"]),
        ("0 0 * * 1", "UTC", "01-01T00:00", ["01-06T00:00"]),
        ("0 0 * * 1-5", "UTC", "01-02T00:00", ["01-03T00:00", "01-06T00:00"]),
        ("0 0 * * MON-FRI", "UTC", "01-02T00:00", ["01-03T00:00", "01-06T00:00"]),
        ("0 0 * * 5-7", "UTC", "01-01T00:00", ["01-03T00:00", "01-04T00:00", "01-05T00:00"]),
        ("0 0 * * 0-2", "UTC", "01-04T00:00", ["01-05T00:00", "01-06T00:00", "01-07T00:00"]),
        ("0 0 * * */2", "UTC", "01-08T00:00", ["01-09T00:00", "01-11T00:00", "01-12T00:00"]),
        ("0 0 * * 6,0", "UTC", "01-01T00:00", ["01-04T00:00", "01-05T00:00"]),
        # Both day fields restricted: either one matching fires (the 13th, and every Friday).
        ("0 0 13 * 5", "UTC", "01-01T00:00", ["01-03T00:00", "01-10T00:00", "01-13T00:00"]),
        # ... but a `*`-led field does not restrict: every other day that is also a Friday.
        ("0 0 */2 * 5", "UTC", "01-01T00:00", ["01-03T00:00", "01-17T00:00"]),
        # Aliases.
        ("@hourly", "UTC", "01-01T12:00", ["01-01T13:00", "01-01T14:00"]),
        ("@daily", "UTC", "01-01T12:00", ["01-02T00:00"]),
        ("@midnight", "UTC", "01-01T12:00", ["01-02T00:00"]),
        ("@weekly", "UTC", "01-01T12:00", ["01-05T00:00", "01-12T00:00"]),
        ("@monthly", "UTC", "01-01T12:00", ["02-01T00:00"]),
        ("@yearly", "UTC", "01-01T12:00", ["2026-01-01T00:00"]),
        ("@annually", "UTC", "01-01T12:00", ["2026-01-01T00:00"]),
        ("  @Daily ", "UTC", "01-01T12:00", ["01-02T00:00"]),
        # Time zones: wall-clock times in the trigger's zone.
        ("0 9 * * *", "Europe/Berlin", "01-01T00:00", ["01-01T08:00"]),
        ("0 9 * * *", "Europe/Berlin", "07-01T00:00", ["07-01T07:00"]),
        ("0 9 * * *", "America/New_York", "01-01T00:00", ["01-01T14:00"]),
        ("0 9 * * *", "America/New_York", "07-01T00:00", ["07-01T13:00"]),
        ("0 9 * * *", "Asia/Kolkata", "01-01T00:00", ["01-01T03:30"]),
        ("0 0 * * *", "Asia/Kathmandu", "01-01T00:00", ["01-01T18:15"]),
        ("0 0 * * 1", "Pacific/Auckland", "01-01T00:00", ["01-05T11:00"]),  # Mon, NZDT
    ],
)
def test_next_fire_table(expression, tz, after, expected):
    assert fires(expression, tz, after, len(expected)) == expected


# Europe/Berlin 2025: spring forward 2025-03-30 01:00Z (02:00 CET -> 03:00 CEST), fall back
# 2025-10-26 01:00Z (03:00 CEST -> 02:00 CET). America/New_York 2025: spring forward
# 2025-03-09 07:00Z (02:00 EST -> 03:00 EDT), fall back 2025-11-02 06:00Z (02:00 EDT -> 01:00 EST).
@pytest.mark.parametrize(
    ("expression", "tz", "start", "end", "expected"),
    [
        # A fixed time in the skipped hour runs once, at the first instant after the gap ...
        (
            "30 2 * * *",
            "Europe/Berlin",
            "03-28T12:00",
            "03-31T12:00",
            ["03-29T01:30", "03-30T01:00", "03-31T00:30"],
        ),
        (
            "30 2 * * *",
            "America/New_York",
            "03-08T12:00",
            "03-10T12:00",
            ["03-09T07:00", "03-10T06:30"],
        ),
        # ... several skipped times (and a fire at the gap's end itself) make one fire ...
        ("0,30 2 * * *", "Europe/Berlin", "03-29T12:00", "03-30T12:00", ["03-30T01:00"]),
        ("0 2,3 * * *", "Europe/Berlin", "03-29T12:00", "03-30T12:00", ["03-30T01:00"]),
        # ... including a midnight that does not exist (Havana moves 00:00 to 01:00) and a
        # half-hour shift (Lord Howe moves 02:00 to 02:30).
        ("@daily", "America/Havana", "03-08T12:00", "03-10T12:00", ["03-09T05:00", "03-10T04:00"]),
        (
            "15 2 * * *",
            "Australia/Lord_Howe",
            "10-04T00:00",
            "10-05T23:00",
            ["10-04T15:30", "10-05T15:15"],
        ),
        # A fixed time in the repeated hour runs once, on its first occurrence.
        (
            "30 2 * * *",
            "Europe/Berlin",
            "10-24T12:00",
            "10-27T12:00",
            ["10-25T00:30", "10-26T00:30", "10-27T01:30"],
        ),
        (
            "30 1 * * *",
            "America/New_York",
            "11-01T12:00",
            "11-03T12:00",
            ["11-02T05:30", "11-03T06:30"],
        ),
        (
            "0 1-3 * * *",
            "America/New_York",
            "11-02T04:00",
            "11-02T09:00",
            ["11-02T05:00", "11-02T07:00", "11-02T08:00"],
        ),
        # Times next to the change are untouched.
        ("15 1 * * *", "America/New_York", "03-08T12:00", "03-09T12:00", ["03-09T06:15"]),
        ("0 3 * * *", "Europe/Berlin", "10-25T12:00", "10-26T12:00", ["10-26T02:00"]),
        # Wildcard schedules follow elapsed time: never a gap, never two at once.
        (
            "*/30 * * * *",
            "Europe/Berlin",
            "03-30T00:00",
            "03-30T02:00",
            ["03-30T00:30", "03-30T01:00", "03-30T01:30", "03-30T02:00"],
        ),
        (
            "*/30 * * * *",
            "America/New_York",
            "11-02T04:00",
            "11-02T07:00",
            [
                "11-02T04:30",
                "11-02T05:00",
                "11-02T05:30",
                "11-02T06:00",
                "11-02T06:30",
                "11-02T07:00",
            ],
        ),
        # The repeated hour's second pass comes after the first, even when a later wall time
        # of the first pass maps to an earlier instant.
        (
            "10,50 * * * *",
            "Europe/Berlin",
            "10-26T00:00",
            "10-26T02:59",
            [
                "10-26T00:10",
                "10-26T00:50",
                "10-26T01:10",
                "10-26T01:50",
                "10-26T02:10",
                "10-26T02:50",
            ],
        ),
        ("10,50 * * * *", "Europe/Berlin", "10-26T00:50", "10-26T01:10", ["10-26T01:10"]),
    ],
)
def test_dst_table(expression, tz, start, end, expected):
    assert fires_between(expression, tz, start, end) == expected


@pytest.mark.parametrize(
    ("tz", "day_start", "day_end", "count"),
    [
        ("Europe/Berlin", "03-29T23:00", "03-30T21:59", 23),
        ("Europe/Berlin", "10-25T22:00", "10-26T22:59", 25),
        ("America/New_York", "03-09T05:00", "03-10T03:59", 23),
        ("America/New_York", "11-02T04:00", "11-03T04:59", 25),
        ("UTC", "03-30T00:00", "03-30T23:59", 24),
    ],
)
def test_hourly_runs_every_elapsed_hour_across_dst(tz, day_start, day_end, count):
    start = (utc(day_start) - timedelta(seconds=1)).isoformat()[:19]  # local midnight counts
    got = [utc(f) for f in fires_between("0 * * * *", tz, start, day_end)]
    assert len(got) == count
    assert all(b - a == timedelta(hours=1) for a, b in zip(got, got[1:], strict=False))


@pytest.mark.parametrize(
    ("expression", "tz", "reason"),
    [
        ("61 * * * *", "UTC", "minute field '61'"),
        ("* 24 * * *", "UTC", "hour field '24'"),
        ("* * 0 * *", "UTC", "day-of-month field '0'"),
        ("* * * 13 *", "UTC", "month field '13'"),
        ("* * * * 8", "UTC", "day-of-week field '8'"),
        ("* * * * 5-1", "UTC", "empty range"),
        ("* * * * funday", "UTC", "not 0-7 or sun-sat"),
        ("*/0 * * * *", "UTC", "minute field '*/0'"),
        ("L * * * *", "UTC", "minute field 'L'"),
        ("0 0 1st * *", "UTC", "day-of-month field"),
        ("* * * *", "UTC", "expected 5 fields"),
        ("0 0 * * * * *", "UTC", "got 7"),
        ("", "UTC", "got 0"),
        # The seconds field of the 6-field form is checked like the others.
        ("60 * * * * *", "UTC", "second field '60'"),
        ("*/0 * * * * *", "UTC", "second field '*/0'"),
        ("5s * * * * *", "UTC", "second field '5s'"),
        ("0 61 * * * *", "UTC", "minute field '61'"),
        ("* * * * * 8", "UTC", "day-of-week field '8'"),
        ("0 0 0 30 2 *", "UTC", "never fires"),
        ("@reboot", "UTC", "unknown alias"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("* * * * *", "Mars/Olympus", "unknown time zone"),
    ],
)
def test_parse_schedule_rejects_with_reason(expression, tz, reason):
    with pytest.raises(ValueError, match=None) as info:
        parse_schedule(expression, tz)
    assert reason in str(info.value)


# Missed fires of "*/5 * * * *" after the last fire at 12:00Z: (policy, now, grace_s) -> the
# fires to run now and how many are skipped.
@pytest.mark.parametrize(
    ("policy", "now", "grace_s", "run", "skipped"),
    [
        ("skip", "12:04:59", 3600, [], 0),
        ("skip", "12:31:00", 3600, [], 6),
        ("run_once", "12:04:59", 3600, [], 0),
        ("run_once", "12:31:00", 3600, ["12:30"], 5),
        ("run_once", "12:31:00", 60, ["12:30"], 5),
        ("run_once", "12:31:00", 59, [], 6),
        ("run_once", "12:30:00", 0, ["12:30"], 5),
        ("run_once", "12:05:01", 3600, ["12:05"], 0),
        ("run_all", "12:31:00", 3600, ["12:05", "12:10", "12:15", "12:20", "12:25", "12:30"], 0),
        ("run_all", "12:31:00", 900, ["12:20", "12:25", "12:30"], 3),
        ("run_all", "12:31:00", 0, [], 6),
        ("run_all", "12:30:00", 0, ["12:30"], 5),
    ],
)
def test_missed_policy_table(policy, now, grace_s, run, skipped):
    schedule = parse_schedule("*/5 * * * *", "UTC")
    now = utc(f"01-01T{now}")
    plan = plan_missed(schedule, utc("01-01T12:00"), now, policy, grace_s)
    assert [f.strftime("%H:%M") for f in plan.run] == run
    assert (plan.skipped, plan.capped) == (skipped, False)
    assert plan.until == now


@pytest.mark.parametrize(
    ("expression", "downtime", "policy", "grace_s", "run", "skipped", "capped"),
    [
        # Two days of a 5-minute job: only the latest runs, 575 are counted as skipped.
        ("*/5 * * * *", timedelta(days=2), "run_once", 3600, ["2025-01-03T12:00Z"], 575, False),
        ("*/5 * * * *", timedelta(days=2), "skip", 3600, [], 576, False),
        (
            "*/5 * * * *",
            timedelta(days=2),
            "run_all",
            1800,
            [f"2025-01-03T11:{m}Z" for m in ("30", "35", "40", "45", "50", "55")]
            + ["2025-01-03T12:00Z"],
            569,
            False,
        ),
        # A year of a daily job, run_once: found without walking the whole year.
        ("0 6 * * *", timedelta(days=365), "run_once", 86400, ["2026-01-01T06:00Z"], 364, False),
        # Past MAX_WALK, the count is a lower bound.
        ("* * * * *", timedelta(days=10), "skip", 3600, [], MAX_WALK, True),
        ("* * * * *", timedelta(days=10), "run_once", 3600, ["2025-01-11T12:00Z"], MAX_WALK, True),
    ],
)
def test_missed_policy_long_downtime_table(
    expression, downtime, policy, grace_s, run, skipped, capped
):
    after = utc("2025-01-01T12:00Z")
    plan = plan_missed(parse_schedule(expression, "UTC"), after, after + downtime, policy, grace_s)
    assert [f.strftime("%Y-%m-%dT%H:%MZ") for f in plan.run] == run
    assert (plan.skipped, plan.capped) == (skipped, capped)


def test_run_all_hands_back_more_than_max_walk_in_rounds():
    schedule, after = parse_schedule("* * * * *", "UTC"), utc("2025-01-01T00:00Z")
    now = after + timedelta(minutes=MAX_WALK + 10)
    plan = plan_missed(schedule, after, now, "run_all", 10**9)
    assert len(plan.run) == MAX_WALK and plan.until == plan.run[-1] and plan.skipped == 0
    rest = plan_missed(schedule, plan.until, now, "run_all", 10**9)
    assert len(rest.run) == 10 and rest.until == now
    assert rest.run[0] - plan.run[-1] == timedelta(minutes=1)


def test_scheduled_event_has_eventbridge_shape_and_a_stable_id():
    nominal = utc("2025-03-30T01:00:00Z")
    event = scheduled_event("report#0", nominal, "eu-central-1")
    event_id = event.pop("id")
    assert event == {
        "version": "0",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": "2025-03-30T01:00:00Z",
        "region": "eu-central-1",
        "resources": ["arn:aws:events:eu-central-1:000000000000:rule/report#0"],
        "detail": {},
    }
    assert str(uuid.UUID(event_id)) == event_id
    assert scheduled_event("report#0", nominal, "eu-central-1")["id"] == event_id
    assert scheduled_event("report#0", nominal + timedelta(minutes=1), "x")["id"] != event_id
    assert scheduled_event("report#1", nominal, "eu-central-1")["id"] != event_id


# --- the 6-field form: a leading seconds field ---------------------------------------------


def fires_s(expression: str, tz: str, after: str, count: int) -> list[str]:
    schedule, at, out = parse_schedule(expression, tz), utc(after), []
    for _ in range(count):
        nxt = schedule.next_after(at)
        assert nxt is not None
        out.append(nxt.strftime("%m-%dT%H:%M:%S"))
        at = nxt
    return out


@pytest.mark.parametrize(
    ("expression", "tz", "after", "expected"),
    [
        ("* * * * * *", "UTC", "01-01T12:00:00", ["01-01T12:00:01", "01-01T12:00:02"]),
        # `after` is exclusive, and a fraction of a second past a fire still counts as after it.
        ("*/2 * * * * *", "UTC", "01-01T12:00:00", ["01-01T12:00:02", "01-01T12:00:04"]),
        ("*/2 * * * * *", "UTC", "01-01T12:00:01.999", ["01-01T12:00:02", "01-01T12:00:04"]),
        ("*/2 * * * * *", "UTC", "01-01T12:00:02.001", ["01-01T12:00:04"]),
        ("*/2 * * * * *", "UTC", "01-01T12:00:58", ["01-01T12:01:00", "01-01T12:01:02"]),
        ("*/7 * * * * *", "UTC", "01-01T12:00:50", ["01-01T12:00:56", "01-01T12:01:00"]),
        ("0,30 * * * * *", "UTC", "01-01T12:00:00", ["01-01T12:00:30", "01-01T12:01:00"]),
        (
            "10-20/5 * * * * *",
            "UTC",
            "01-01T12:00:00",
            ["01-01T12:00:10", "01-01T12:00:15", "01-01T12:00:20", "01-01T12:01:10"],
        ),
        # The other fields keep their 5-field meaning, one place to the right.
        ("30 0 * * * *", "UTC", "01-01T12:00:30", ["01-01T13:00:30", "01-01T14:00:30"]),
        ("15 30 9 * * *", "UTC", "01-01T00:00", ["01-01T09:30:15", "01-02T09:30:15"]),
        (
            "*/20 59 23 31 12 *",
            "UTC",
            "01-01T00:00",
            ["12-31T23:59:00", "12-31T23:59:20", "12-31T23:59:40"],
        ),
        ("0 0 0 * * 0", "UTC", "01-01T00:00", ["01-05T00:00:00", "01-12T00:00:00"]),  # Sundays
        ("0 0 9 * * mon-fri", "UTC", "01-03T10:00", ["01-06T09:00:00"]),
        ("45 0 9 * * *", "Europe/Berlin", "01-01T00:00", ["01-01T08:00:45"]),
        ("45 0 9 * * *", "Asia/Kathmandu", "01-01T00:00", ["01-01T03:15:45"]),
        # A leading 0 is the 5-field form written out.
        ("0 */5 * * * *", "UTC", "01-01T12:03", ["01-01T12:05:00", "01-01T12:10:00"]),
    ],
)
def test_next_fire_with_seconds_table(expression, tz, after, expected):
    assert fires_s(expression, tz, after, len(expected)) == expected


@pytest.mark.parametrize(
    ("five", "six"),
    [
        ("*/5 * * * *", "0 */5 * * * *"),
        ("0 9 * * 1-5", "0 0 9 * * 1-5"),
        ("30 2 * * *", "0 30 2 * * *"),
        ("@hourly", "0 0 * * * *"),
    ],
)
def test_seconds_zero_fires_like_the_five_field_form(five, six):
    for tz, after in (
        ("UTC", "01-01T12:00"),
        ("Europe/Berlin", "03-29T12:00"),
        ("Europe/Berlin", "10-25T12:00"),
    ):
        assert fires(five, tz, after, 30) == fires(six, tz, after, 30)


# Europe/Berlin 2025: spring forward 2025-03-30 01:00Z, fall back 2025-10-26 01:00Z.
@pytest.mark.parametrize(
    ("expression", "start", "end", "expected"),
    [
        # A fixed minute and hour inside the gap: its seconds all become one fire at its end.
        ("*/20 30 2 * * *", "03-30T00:00", "03-30T02:00", ["03-30T01:00:00"]),
        # A fixed time in the repeated hour: first occurrence only.
        ("10 30 2 * * *", "10-26T00:00", "10-26T02:00", ["10-26T00:30:10"]),
        # Wildcard schedules follow elapsed time: 30 s apart straight through both changes.
        (
            "*/30 * * * * *",
            "03-30T00:59",
            "03-30T01:01",
            ["03-30T00:59:30", "03-30T01:00:00", "03-30T01:00:30", "03-30T01:01:00"],
        ),
        (
            "*/30 * * * * *",
            "10-26T00:59",
            "10-26T01:01",
            ["10-26T00:59:30", "10-26T01:00:00", "10-26T01:00:30", "10-26T01:01:00"],
        ),
    ],
)
def test_seconds_dst_table(expression, start, end, expected):
    schedule, at, out = parse_schedule(expression, "Europe/Berlin"), utc(start), []
    while (nxt := schedule.next_after(at)) is not None and nxt <= utc(end):
        out.append(nxt.strftime("%m-%dT%H:%M:%S"))
        at = nxt
    assert out == expected


# Missed fires of "*/2 * * * * *" after the last fire at 12:00:00Z.
@pytest.mark.parametrize(
    ("policy", "now", "grace_s", "run", "skipped"),
    [
        ("skip", "12:00:09.5", 3600, [], 4),
        ("run_once", "12:00:09.5", 3600, ["12:00:08"], 3),
        ("run_once", "12:00:09.5", 1, [], 4),
        ("run_all", "12:00:09.5", 3600, ["12:00:02", "12:00:04", "12:00:06", "12:00:08"], 0),
        ("run_all", "12:00:09.5", 4, ["12:00:06", "12:00:08"], 2),
        ("run_all", "12:00:01.9", 3600, [], 0),
    ],
)
def test_missed_policy_with_seconds_table(policy, now, grace_s, run, skipped):
    schedule = parse_schedule("*/2 * * * * *", "UTC")
    now = utc(f"01-01T{now}")
    plan = plan_missed(schedule, utc("01-01T12:00:00"), now, policy, grace_s)
    assert [f.strftime("%H:%M:%S") for f in plan.run] == run
    assert (plan.skipped, plan.capped, plan.until) == (skipped, False, now)


def test_scheduled_event_time_and_id_per_second():
    nominal = utc("2025-03-30T01:00:07Z")
    event = scheduled_event("tick#0", nominal, "us-east-1")
    assert event["time"] == "2025-03-30T01:00:07Z"
    later = scheduled_event("tick#0", nominal + timedelta(seconds=1), "us-east-1")
    assert later["id"] != event["id"]


# EventBridge expressions, from a fixed instant (2025-01-01 is a Wednesday). Day-of-week is
# EventBridge's 1-7 = SUN-SAT, so 2 is Monday and 6L the last Friday; rates count from the epoch.
@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("rate(1 minute)", "01-01T00:00:30", ["01-01T00:01", "01-01T00:02", "01-01T00:03"]),
        ("rate(5 minutes)", "01-01T00:07", ["01-01T00:10", "01-01T00:15", "01-01T00:20"]),
        ("rate(1 hour)", "01-01T00:00", ["01-01T01:00", "01-01T02:00", "01-01T03:00"]),
        ("rate(2 days)", "01-01T00:00", ["01-02T00:00", "01-04T00:00", "01-06T00:00"]),
        ("rate(90 minutes)", "01-01T00:00", ["01-01T01:30", "01-01T03:00", "01-01T04:30"]),
        ("rate(36500 days)", "01-01T00:00", ["2069-12-07T00:00"]),
        (" rate( 1  day ) ", "01-01T00:00", ["01-02T00:00", "01-03T00:00", "01-04T00:00"]),
        ("cron(0 12 * * ? *)", "01-01T12:00", ["01-02T12:00", "01-03T12:00", "01-04T12:00"]),
        ("cron(0/15 * * * ? *)", "01-01T00:00", ["01-01T00:15", "01-01T00:30", "01-01T00:45"]),
        ("cron(10/20 8 * * ? *)", "01-01T00:00", ["01-01T08:10", "01-01T08:30", "01-01T08:50"]),
        ("cron(0 9 ? * 2 *)", "01-01T00:00", ["01-06T09:00", "01-13T09:00", "01-20T09:00"]),
        ("cron(0 9 ? * 1 *)", "01-01T00:00", ["01-05T09:00", "01-12T09:00", "01-19T09:00"]),
        ("cron(0 9 ? * 7 *)", "01-01T00:00", ["01-04T09:00", "01-11T09:00", "01-18T09:00"]),
        ("cron(0 9 ? * SUN,SAT *)", "01-01T00:00", ["01-04T09:00", "01-05T09:00", "01-11T09:00"]),
        ("cron(0 9 ? * MON-FRI *)", "01-02T10:00", ["01-03T09:00", "01-06T09:00", "01-07T09:00"]),
        ("cron(0 9 ? * 6-2 *)", "01-02T10:00", ["01-03T09:00", "01-04T09:00", "01-05T09:00"]),
        ("cron(0 9 ? * 2/2 *)", "01-01T10:00", ["01-03T09:00", "01-06T09:00", "01-08T09:00"]),
        ("cron(0 9 ? * 6L *)", "01-01T00:00", ["01-31T09:00", "02-28T09:00", "03-28T09:00"]),
        ("cron(0 9 ? * 3#2 *)", "01-01T00:00", ["01-14T09:00", "02-11T09:00", "03-11T09:00"]),
        ("cron(0 9 ? * 2#5 *)", "01-01T00:00", ["03-31T09:00", "06-30T09:00", "09-29T09:00"]),
        ("cron(0 9 ? * 4,6L *)", "01-22T10:00", ["01-29T09:00", "01-31T09:00", "02-05T09:00"]),
        ("cron(0 0 L * ? *)", "01-01T00:00", ["01-31T00:00", "02-28T00:00", "03-31T00:00"]),
        ("cron(0 0 1,L * ? *)", "01-01T00:00", ["01-31T00:00", "02-01T00:00", "02-28T00:00"]),
        ("cron(0 22-1 * * ? *)", "01-01T00:00", ["01-01T01:00", "01-01T22:00", "01-01T23:00"]),
        ("cron(0 0 1 JAN-MAR/2 ? *)", "01-01T00:00", ["03-01T00:00", "2026-01-01T00:00"]),
        ("cron(30 6 1 1 ? 2027,2029)", "01-01T00:00", ["2027-01-01T06:30", "2029-01-01T06:30"]),
    ],
)
def test_eventbridge_expression_next_fires(expression, after, expected):
    assert fires(expression, "UTC", after, len(expected)) == expected


def test_eventbridge_cron_follows_the_trigger_time_zone_and_its_dst_rule():
    # A fixed-time EventBridge cron is a wall-clock schedule like the 5-field form.
    got = fires("cron(30 2 * * ? *)", "Europe/Berlin", "03-29T12:00", 3)
    assert got == ["03-30T01:00", "03-31T00:30", "04-01T00:30"]
    # A rate follows elapsed time: the zone does not move it.
    assert fires("rate(1 hour)", "Europe/Berlin", "03-30T00:30", 2) == [
        "03-30T01:00",
        "03-30T02:00",
    ]


@pytest.mark.parametrize(
    ("expression", "syntax", "reason"),
    [
        (
            "rate(5 minute)",
            "rate(value unit)",
            "unit 'minute' with value 5: EventBridge wants 'minutes'",
        ),
        ("rate(1 hours)", "rate(value unit)", "EventBridge wants 'hour'"),
        ("rate(0 minutes)", "rate(value unit)", "value 0"),
        ("rate(2 weeks)", "rate(value unit)", "unit 'weeks'"),
        ("rate(30 seconds)", "rate(value unit)", "unit 'seconds'"),
        ("rate(five minutes)", "rate(value unit)", "expected a whole number and a unit"),
        ("rate(36501 days)", "rate(value unit)", "longer than 36500 days"),
        ("rate(99999999999 minutes)", "rate(value unit)", "longer than 36500 days"),
        ("cron(0 12 * * * *)", "cron(minutes", "exactly one of them must be '?'"),
        ("cron(0 12 ? * ? *)", "cron(minutes", "exactly one of them must be '?'"),
        ("cron(0 12 * *)", "cron(minutes", "expected 6 fields"),
        ("cron(0 12 15W * ? *)", "cron(minutes", "'15W' (W, the nearest weekday) is not supported"),
        ("cron(0 12 LW * ? *)", "cron(minutes", "'LW' (W, the nearest weekday)"),
        ("cron(0 12 L-3 * ? *)", "cron(minutes", "'L-3' (an offset from the last day)"),
        ("cron(0 12 ? * L *)", "cron(minutes", "'L' alone is not supported"),
        ("cron(0 12 ? * 0 *)", "cron(minutes", "day-of-week field '0': '0' is not 1-7 or SUN-SAT"),
        ("cron(0 12 ? * 8 *)", "cron(minutes", "'8' is not 1-7"),
        ("cron(0 12 ? * 3#1,6#3 *)", "cron(minutes", "only one '#' term"),
        ("cron(0 12 ? * 3#6 *)", "cron(minutes", "'#' takes 1 to 5"),
        ("cron(60 12 * * ? *)", "cron(minutes", "minutes field '60'"),
        ("cron(0 24 * * ? *)", "cron(minutes", "hours field '24'"),
        ("cron(0 12 * 13 ? *)", "cron(minutes", "month field '13'"),
        ("cron(0 12 * * ? 1969)", "cron(minutes", "year field '1969'"),
        ("cron(0/0 12 * * ? *)", "cron(minutes", "a step of 0"),
        ("cron(0 0 30 2 ? *)", "cron(minutes", "never fires"),
        ("0 12 * * ? *", "crontab syntax", "'?' is EventBridge syntax"),
        ("61 * * * *", "crontab syntax", "minute field '61'"),
    ],
)
def test_schedule_error_names_the_syntax_tried_and_the_part_refused(expression, syntax, reason):
    with pytest.raises(ValueError, match=None) as info:
        parse_schedule(expression, "UTC")
    assert syntax in str(info.value) and reason in str(info.value), str(info.value)
