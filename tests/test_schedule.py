"""Schedules: crontab(5) syntax, cron(8) DST behaviour, epoch-aligned ``every``, ``at``, run IDs.

The DST tests compare the module against a brute-force oracle written here, independent of
cronsim: walk every UTC minute, convert it with zoneinfo, and apply cron(8)'s rule directly.
"""

from __future__ import annotations

import functools
import itertools
import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from singleton.errors import ConfigError
from singleton.schedule import (
    at_schedule,
    cron_schedule,
    every_schedule,
    fire_times,
    manual_run_id,
    run_id,
    zone,
)

MINUTE = timedelta(minutes=1)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def z(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def fires_between(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    schedule = cron_schedule(expr, tz)
    found: list[datetime] = []
    moment = start
    while (fire := schedule.next_after(moment)) is not None and fire <= end:
        found.append(fire)
        moment = fire
    return found


# --------------------------------------------------------------------------- the oracle


def _allowed(text: str, high: int) -> set[int]:
    """Just enough of crontab(5) for the oracle's expressions: *, */n, n and n,m."""
    if text == "*":
        return set(range(high + 1))
    if text.startswith("*/"):
        return set(range(0, high + 1, int(text[2:])))
    return {int(value) for value in text.split(",")}


def _oracle(expr: str, tz_name: str, start: datetime, end: datetime) -> list[datetime]:
    """Fire instants in (start, end] by cron(8)'s rule, minute by minute.

    Wall-clock jobs (minute or hour field starts with ``*``) fire at every UTC minute whose
    local time matches. Fixed-time jobs fire on the first pass of a matching local time only,
    and, at a forward jump, once at the first minute after it for any matching local time
    the jump skipped.
    """
    fields = expr.split()
    seconds = [0]
    if len(fields) == 6:
        seconds = sorted(_allowed(fields[0], 59))
        fields = fields[1:]
    minute_text, hour_text, dom_text, month_text, dow_text = fields
    assert month_text == "*", "the oracle knows no months"
    minutes, hours = _allowed(minute_text, 59), _allowed(hour_text, 23)
    doms, dows = _allowed(dom_text, 31), {day % 7 for day in _allowed(dow_text, 7)}
    either_day = not dom_text.startswith("*") and not dow_text.startswith("*")
    wall_clock = minute_text.startswith("*") or hour_text.startswith("*")
    tz = ZoneInfo(tz_name)

    def matches(wall: datetime) -> bool:
        if wall.minute not in minutes or wall.hour not in hours:
            return False
        on_dom, on_dow = wall.day in doms, wall.isoweekday() % 7 in dows
        return (on_dom or on_dow) if either_day else (on_dom and on_dow)

    fires: list[datetime] = []
    t = start.replace(second=0, microsecond=0)
    previous = (t - MINUTE).astimezone(tz).replace(tzinfo=None)
    while t <= end:
        local = t.astimezone(tz)
        wall = local.replace(tzinfo=None)
        if wall_clock:
            fire = matches(wall)
        else:
            fire = matches(wall) and local.fold == 0
            skipped = previous + MINUTE
            while skipped < wall:
                fire = fire or matches(skipped)
                skipped += MINUTE
        if fire:
            fires.extend(t + timedelta(seconds=s) for s in seconds)
        previous = wall
        t += MINUTE
    return [f for f in fires if start < f <= end]


DST_DAYS = [
    ("Europe/Berlin", "2026-03-29"),
    ("Europe/Berlin", "2026-10-25"),
    ("America/New_York", "2026-03-08"),
    ("America/New_York", "2026-11-01"),
    ("Australia/Lord_Howe", "2026-04-05"),
    ("Australia/Lord_Howe", "2026-10-04"),
]
ORACLE_EXPRS = [
    "30 1 * * *",
    "30 2 * * *",
    "0 * * * *",
    "*/15 * * * *",
    "15,45 2 * * *",
    "0 30 2 * * *",
]


# Where cronsim alone disagrees with cron(8): wall-clock jobs near a 30- or 45-minute zone's
# change, or in a zone that changes at midnight (and Chatham's `* 3 * * *`, where it hangs).
WALL_CLOCK_EDGES = [
    ("* 3 * * *", "Australia/Lord_Howe", "2026-04-05"),
    ("* 3 * * *", "Australia/Lord_Howe", "2026-10-04"),
    ("30 * * * 0", "Australia/Lord_Howe", "2026-04-05"),
    ("*/10 2,3 * * *", "Australia/Lord_Howe", "2026-04-05"),
    ("* 3 * * *", "Pacific/Chatham", "2026-04-05"),
    ("* 1 * * 0", "America/Santiago", "2026-09-06"),
    ("* 0 6 * *", "America/Santiago", "2026-09-06"),
    ("* 0 24 * *", "Africa/Cairo", "2026-04-24"),
]
ALL_ORACLE_CASES = [(e, tz, day) for e in ORACLE_EXPRS for tz, day in DST_DAYS] + WALL_CLOCK_EDGES


def _window(day: str) -> tuple[datetime, datetime]:
    midnight = utc(f"{day}T00:00:00Z")
    return midnight - timedelta(hours=14), midnight + timedelta(hours=48)


@functools.cache
def _oracle_fires(expr: str, tz: str, day: str) -> tuple[datetime, ...]:
    return tuple(_oracle(expr, tz, *_window(day)))


@pytest.mark.parametrize(("tz", "day"), DST_DAYS)
def test_oracle_windows_span_a_dst_change(tz: str, day: str) -> None:
    start, end = _window(day)
    assert start.astimezone(ZoneInfo(tz)).utcoffset() != end.astimezone(ZoneInfo(tz)).utcoffset()


@pytest.mark.parametrize("expr", ORACLE_EXPRS)
@pytest.mark.parametrize(("tz", "day"), DST_DAYS)
def test_fire_times_across_dst_match_the_cron8_oracle(expr: str, tz: str, day: str) -> None:
    start, end = _window(day)
    assert fires_between(expr, tz, start, end) == list(_oracle_fires(expr, tz, day))


@pytest.mark.parametrize(("expr", "tz", "day"), WALL_CLOCK_EDGES)
def test_wall_clock_jobs_at_awkward_changes_match_the_cron8_oracle(
    expr: str, tz: str, day: str
) -> None:
    start, end = _window(day)
    assert fires_between(expr, tz, start, end) == list(_oracle_fires(expr, tz, day))


@settings(max_examples=150, deadline=None, database=None)
@given(
    case=st.sampled_from(ALL_ORACLE_CASES),
    offset=st.integers(min_value=0, max_value=34 * 3600 * 1_000_000),
)
def test_next_after_any_instant_matches_the_oracle(
    case: tuple[str, str, str], offset: int
) -> None:
    expr, tz, day = case
    moment = _window(day)[0] + timedelta(microseconds=offset)
    expected = next((f for f in _oracle_fires(expr, tz, day) if f > moment), None)
    got = cron_schedule(expr, tz).next_after(moment)
    if expected is None:  # a weekly or yearly job whose next firing is past the window
        assert got is not None and got > _window(day)[1]
    else:
        assert got == expected


# --------------------------------------------------------------------------- cron and DST


def test_daily_0230_berlin_runs_once_on_the_fall_back_day_the_first_time() -> None:
    schedule = cron_schedule("30 2 * * *", "Europe/Berlin")
    got = fire_times(schedule, utc("2026-10-24T20:00:00Z"), 3)
    assert [z(t) for t in got] == [
        "2026-10-25T00:30:00Z",
        "2026-10-26T01:30:00Z",
        "2026-10-27T01:30:00Z",
    ]


def test_fixed_time_skipped_by_spring_forward_runs_at_the_jump() -> None:
    schedule = cron_schedule("30 2 * * *", "Europe/Berlin")
    assert z(schedule.next_after(utc("2026-03-28T12:00:00Z"))) == "2026-03-29T01:00:00Z"


def test_next_after_from_the_second_pass_of_a_repeated_hour_is_strictly_later() -> None:
    # 01:15Z is 02:15 CET, after that day's only 02:30 (00:30Z) has already fired.
    schedule = cron_schedule("30 2 * * *", "Europe/Berlin")
    assert z(schedule.next_after(utc("2026-10-25T01:15:00Z"))) == "2026-10-26T01:30:00Z"


def test_hourly_job_runs_both_passes_of_a_repeated_hour_with_distinct_run_ids() -> None:
    schedule = cron_schedule("30 * * * *", "America/New_York")
    first, second = fire_times(schedule, utc("2026-11-01T05:00:00Z"), 2)
    tz = ZoneInfo("America/New_York")
    assert first.astimezone(tz).strftime("%H:%M") == second.astimezone(tz).strftime("%H:%M")
    assert run_id("compact", first) == "compact@2026-11-01T05:30:00Z"
    assert run_id("compact", second) == "compact@2026-11-01T06:30:00Z"


def test_six_field_fixed_time_skipped_by_spring_forward_runs_at_the_jump_plus_seconds() -> None:
    schedule = cron_schedule("15 30 2 * * *", "Europe/Berlin")
    assert z(schedule.next_after(utc("2026-03-28T12:00:00Z"))) == "2026-03-29T01:00:15Z"


def test_fire_times_are_utc_whole_seconds_strictly_after() -> None:
    schedule = cron_schedule("* * * * *", "Asia/Kolkata")
    moment = utc("2026-05-01T10:00:00Z").replace(microsecond=500_000)
    fire = schedule.next_after(moment)
    assert fire == utc("2026-05-01T10:01:00Z")
    assert fire.tzinfo is UTC and fire.microsecond == 0
    assert schedule.next_after(fire) == utc("2026-05-01T10:02:00Z")


def test_next_after_accepts_a_moment_in_any_zone() -> None:
    schedule = cron_schedule("0 12 * * *", "UTC")
    moment = datetime(2026, 5, 1, 13, 0, tzinfo=ZoneInfo("Europe/Berlin"))  # 11:00Z
    assert schedule.next_after(moment) == utc("2026-05-01T12:00:00Z")


def test_next_after_refuses_a_naive_moment() -> None:
    with pytest.raises(ValueError, match="needs a timezone"):
        cron_schedule("0 * * * *", "UTC").next_after(datetime(2026, 5, 1))


# --------------------------------------------------------------------------- cron syntax

YEAR_START, YEAR_END = utc("2025-12-31T12:00:00Z"), utc("2026-12-31T12:00:00Z")


def _days(expr: str) -> list[datetime]:
    return fires_between(expr, "UTC", YEAR_START, YEAR_END)


def test_day_of_week_7_is_sunday_like_0_and_sun() -> None:
    sundays = _days("0 0 * * 0")
    assert sundays == _days("0 0 * * 7") == _days("0 0 * * sun") == _days("0 0 * * SUN")
    assert len(sundays) == 52
    assert all(day.weekday() == 6 for day in sundays)


def test_names_are_case_insensitive_and_work_in_ranges_and_lists() -> None:
    assert _days("0 9 * jan,JUL Mon-fri") == _days("0 9 * 1,7 1-5")


def test_restricted_day_of_month_and_day_of_week_run_on_either() -> None:
    got = {d.date() for d in _days("0 0 13 * fri")}
    every_day = {(YEAR_START + timedelta(days=n)).date() for n in range(1, 366)}
    assert got == {d for d in every_day if d.day == 13 or d.weekday() == 4}


def test_day_field_starting_with_star_requires_both() -> None:
    got = _days("0 0 */2 * fri")
    assert got
    assert all(d.weekday() == 4 and d.day % 2 == 1 for d in got)
    assert all(d.weekday() == 4 for d in _days("0 0 * * fri"))


def test_full_range_day_of_month_is_restricted_so_or_applies() -> None:
    assert len(_days("0 0 1-31 * fri")) == 365


@pytest.mark.parametrize(
    ("alias", "expr"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_alias_is_its_expression(alias: str, expr: str) -> None:
    start = utc("2026-01-01T00:30:00Z")
    assert fire_times(cron_schedule(alias, "Europe/Berlin"), start, 5) == fire_times(
        cron_schedule(expr, "Europe/Berlin"), start, 5
    )


def test_ranges_with_steps_and_start_with_step() -> None:
    got = fires_between("5/20 9-17/4 * * *", "UTC", YEAR_START, YEAR_START + timedelta(days=1))
    assert sorted({(t.hour, t.minute) for t in got}) == [
        (h, m) for h in (9, 13, 17) for m in (5, 25, 45)
    ]


def test_six_field_expression_fires_at_its_seconds() -> None:
    schedule = cron_schedule("*/20 * * * * *", "UTC")
    got = fire_times(schedule, utc("2026-05-01T10:00:30Z"), 4)
    assert [t.strftime("%M:%S") for t in got] == ["00:40", "01:00", "01:20", "01:40"]


def test_min_period_is_a_second_with_seconds_field_else_a_minute() -> None:
    assert cron_schedule("* * * * * *", "UTC").min_period == 1
    assert cron_schedule("* * * * *", "UTC").min_period == 60


def test_cron_describes_itself_with_its_zone() -> None:
    assert cron_schedule("30 2 * * *", "Europe/Berlin").describe() == (
        "cron '30 2 * * *' Europe/Berlin"
    )


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("60 * * * *", "cron '60 * * * *': minute field '60' out of range 0-59"),
        ("*/0 * * * *", "cron '*/0 * * * *': step must be at least 1 in minute field '*/0'"),
        ("0 0 30 2 *", "cron '0 0 30 2 *': schedule never fires"),
        ("0 0 31 4,6,9,11 *", "cron '0 0 31 4,6,9,11 *': schedule never fires"),
        ("* * * *", "cron '* * * *': expected 5 fields (or 6 with seconds first), got 4"),
        (
            "0 0 0 * * * *",
            "cron '0 0 0 * * * *': expected 5 fields (or 6 with seconds first), got 7",
        ),
        ("", "cron '': empty expression, expected 5 fields (or 6 with seconds first)"),
        ("0 24 * * *", "cron '0 24 * * *': hour field '24' out of range 0-23"),
        ("0 0 * * 8", "cron '0 0 * * 8': day-of-week field '8' out of range 0-7"),
        ("61 * * * * *", "cron '61 * * * * *': second field '61' out of range 0-59"),
        ("0 0 0 * *", "cron '0 0 0 * *': day-of-month field '0' out of range 1-31"),
        (
            "0 0 * foo *",
            "cron '0 0 * foo *': month field 'foo': 'foo' is not a number 1-12 or a name jan-dec",
        ),
        ("5-1 * * * *", "cron '5-1 * * * *': minute field '5-1': range 5-1 runs backwards"),
        ("*/x * * * *", "cron '*/x * * * *': minute field '*/x': step 'x' is not a number"),
        ("1,,2 * * * *", "cron '1,,2 * * * *': minute field '1,,2': '' is not a number 0-59"),
        (
            "@reboot",
            "cron '@reboot': @reboot is not a schedule; start the command with the service",
        ),
        (
            "@fortnightly",
            "cron '@fortnightly': unknown alias, use one of @yearly, @annually, @monthly, "
            "@weekly, @daily, @midnight, @hourly",
        ),
        (
            "0 0 ? * mon",
            "cron '0 0 ? * mon': '?' is Quartz syntax, not crontab; write '*' instead",
        ),
    ],
)
def test_bad_cron_is_a_one_line_config_error(expr: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cron_schedule(expr, "UTC")
    assert str(caught.value) == message


def test_cron_with_misspelt_zone_suggests_the_real_one() -> None:
    with pytest.raises(ConfigError, match=re.escape("did you mean Europe/Berlin?")):
        cron_schedule("0 * * * *", "Europe/Berln")


# --------------------------------------------------------------------------- zones


def test_zone_returns_the_zone() -> None:
    assert zone("Australia/Lord_Howe") == ZoneInfo("Australia/Lord_Howe")


def test_unknown_zone_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError) as caught:
        zone("US/Pacifc")
    assert str(caught.value) == "unknown timezone 'US/Pacifc' (did you mean US/Pacific?)"


def test_zone_in_the_wrong_case_suggests_the_right_case() -> None:
    with pytest.raises(ConfigError, match=re.escape("(did you mean Europe/Berlin?)")):
        zone("europe/berlin")


def test_zone_with_nothing_close_says_what_to_write() -> None:
    with pytest.raises(ConfigError) as caught:
        zone("../../etc/passwd")
    assert str(caught.value) == (
        "unknown timezone '../../etc/passwd': use an IANA name such as Europe/Berlin or UTC"
    )


# --------------------------------------------------------------------------- every


def test_every_fires_at_multiples_of_the_interval_since_the_epoch() -> None:
    got = fire_times(every_schedule(7), utc("2026-05-01T10:00:00.250Z"), 20)
    assert all(int(t.timestamp()) % 7 == 0 for t in got)
    assert all(b - a == timedelta(seconds=7) for a, b in itertools.pairwise(got))
    assert got[0] - timedelta(seconds=7) <= utc("2026-05-01T10:00:00.250Z") < got[0]


def test_every_with_anchor_counts_from_the_anchor_in_both_directions() -> None:
    schedule = every_schedule(3600, anchor=utc("2030-01-01T00:20:00Z"))
    assert z(schedule.next_after(utc("2026-05-01T10:00:00Z"))) == "2026-05-01T10:20:00Z"
    assert z(schedule.next_after(utc("2031-05-01T10:20:00Z"))) == "2031-05-01T11:20:00Z"


def test_every_accepts_a_whole_float() -> None:
    assert every_schedule(2.0).next_after(utc("2026-05-01T10:00:00Z")) == utc(
        "2026-05-01T10:00:02Z"
    )


@settings(max_examples=100, deadline=None, database=None)
@given(
    interval=st.integers(min_value=1, max_value=10**7),
    anchor=st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    moment=st.datetimes(
        min_value=datetime(1950, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
    ),
)
def test_every_next_is_the_first_anchor_multiple_after_moment(
    interval: int, anchor: datetime, moment: datetime
) -> None:
    fire = every_schedule(interval, anchor).next_after(moment)
    assert fire is not None and fire.microsecond == 0
    assert moment < fire <= moment + timedelta(seconds=interval)
    assert (fire - anchor.replace(microsecond=0)) % timedelta(seconds=interval) == timedelta(0)


def test_every_ends_where_datetime_ends() -> None:
    assert every_schedule(60).next_after(datetime(9999, 12, 31, 23, 59, 30, tzinfo=UTC)) is None


@pytest.mark.parametrize(
    ("seconds", "shown"), [(1.5, "1.5s"), (0, "0s"), (0.5, "0.5s"), (-3, "-3s")]
)
def test_every_refuses_fractions_and_less_than_a_second(seconds: float, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        every_schedule(seconds)
    assert str(caught.value) == (
        f"every must be a whole number of seconds, at least 1s, got {shown}"
    )


def test_every_refuses_a_naive_anchor() -> None:
    with pytest.raises(ConfigError, match="anchor needs a timezone"):
        every_schedule(60, anchor=datetime(2026, 1, 1))


def test_every_describes_interval_and_anchor() -> None:
    assert every_schedule(2).describe() == "every 2s"
    assert every_schedule(5400, utc("2026-01-01T00:00:00Z")).describe() == (
        "every 1h30m from 2026-01-01T00:00:00Z"
    )
    assert every_schedule(2).min_period == 2


# --------------------------------------------------------------------------- at


def test_at_fires_once() -> None:
    schedule = at_schedule(datetime(2026, 12, 1, 3, 0, tzinfo=ZoneInfo("Europe/Berlin")))
    assert fire_times(schedule, utc("2026-01-01T00:00:00Z"), 3) == [utc("2026-12-01T02:00:00Z")]
    assert schedule.next_after(utc("2026-12-01T02:00:00Z")) is None
    assert schedule.describe() == "at 2026-12-01T02:00:00Z"
    assert schedule.min_period is None


def test_at_refuses_a_naive_instant() -> None:
    with pytest.raises(ConfigError, match="at needs a timezone"):
        at_schedule(datetime(2026, 12, 1))


# --------------------------------------------------------------------------- run IDs


def test_run_id_is_job_at_utc_seconds_z() -> None:
    moment = datetime(2026, 12, 1, 2, 30, 0, 999_000, tzinfo=ZoneInfo("Europe/Berlin"))
    assert run_id("compact", moment) == "compact@2026-12-01T01:30:00Z"


def test_manual_run_id_is_job_at_manual_uuid() -> None:
    first, second = manual_run_id("compact"), manual_run_id("compact")
    pattern = r"compact@manual-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(pattern, first)
    assert first != second
