"""When a job fires: ``cron``, ``every`` and ``at`` schedules, and the run IDs that name firings.

Every replica computes the same schedule on its own and must arrive at the same instants, or
no two replicas would agree on a run ID. So nothing here depends on when a process started
or on the host's timezone: instants go in and come out timezone-aware, fire times are whole
UTC seconds, ``every`` counts from the Unix epoch (or a configured anchor), and ``cron`` is
evaluated in the job's own zone.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import timezone as fixed_offset
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError

from singleton.clock import iso_z
from singleton.durations import format_duration
from singleton.errors import ConfigError

__all__ = [
    "Schedule",
    "at_schedule",
    "cron_schedule",
    "every_schedule",
    "fire_times",
    "manual_run_id",
    "run_id",
    "zone",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_SECOND = timedelta(seconds=1)
_ONE_MINUTE = timedelta(minutes=1)
_ONE_DAY = timedelta(days=1)
# Where the "does it ever fire" probe starts. Fixed rather than "now", so that whether a
# configuration is valid never depends on the day it is loaded.
_PROBE_FROM = datetime(2000, 1, 1, tzinfo=UTC)


class Schedule(Protocol):
    """What the runner needs from a schedule: the next instant, a label, a time scale."""

    def next_after(self, moment: datetime) -> datetime | None:
        """First fire instant strictly after ``moment`` (aware), as aware UTC, microsecond 0.

        None when the schedule has no more firings. "Strictly after" lets a caller feed each
        result back in without ever firing the same instant twice.
        """
        ...

    def describe(self) -> str:
        """One line for logs and ``status`` output, in the terms the user configured."""
        ...

    @property
    def min_period(self) -> float | None:
        """The smallest gap between firings in seconds, if known; None for a single firing."""
        ...

    def crontab(self) -> tuple[str, str] | None:
        """The same instants as a five-field crontab and its timezone, where minute
        resolution can say them (for monitors such as Sentry Crons); None otherwise."""
        ...


# --------------------------------------------------------------------------- cron


_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] = field(default_factory=dict)


_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec"
_DAYS = "sun mon tue wed thu fri sat"
_SECONDS_FIELD = _Field("second", 0, 59)
_MINUTE_LEVEL_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, {n: i for i, n in enumerate(_MONTHS.split(), start=1)}),
    _Field("day-of-week", 0, 7, {n: i for i, n in enumerate(_DAYS.split())}),
)


class _FieldError(Exception):
    """A problem with one field; the caller adds the expression so the message is one line."""


def _value(spec: _Field, text: str, token: str) -> int:
    if _NUMBER.fullmatch(token):
        number = int(token)
        if not spec.low <= number <= spec.high:
            raise _FieldError(f"{spec.name} field '{text}' out of range {spec.low}-{spec.high}")
        return number
    if token.lower() in spec.names:
        return spec.names[token.lower()]
    hint = f" {spec.low}-{spec.high}"
    if spec.names:
        first, *_, last = spec.names
        hint += f" or a name {first}-{last}"
    raise _FieldError(f"{spec.name} field '{text}': '{token}' is not a number{hint}")


def _field_values(spec: _Field, text: str) -> set[int]:
    """The values a crontab(5) field allows, checking it the way a user needs to hear about.

    cronsim validates too, but only says "Bad minute"; naming the field and the value turns
    that into a message someone can act on without reading the crontab manual.
    """
    values: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not _NUMBER.fullmatch(step_text):
                raise _FieldError(f"{spec.name} field '{text}': step '{step_text}' is not a number")
            step = int(step_text)
            if step < 1:
                raise _FieldError(f"step must be at least 1 in {spec.name} field '{text}'")
        if base == "*":
            first, last = spec.low, spec.high
        else:
            start, dash, end = base.partition("-")
            first = _value(spec, text, start)
            # "5/15" means "from 5 to the end, every 15", as cronsim reads it.
            last = _value(spec, text, end) if dash else spec.high if slash else first
            if last < first:
                raise _FieldError(f"{spec.name} field '{text}': range {base} runs backwards")
        values.update(range(first, last + 1, step))
    return values


def _split(expr: str) -> list[str]:
    """The fields of ``expr`` after alias translation, refusing what crontab(5) does not know."""
    text = expr.strip()
    if not text:
        raise ConfigError(
            f"cron '{expr}': empty expression, expected 5 fields (or 6 with seconds first)"
        )
    if text.startswith("@"):
        if text.lower() == "@reboot":
            raise ConfigError(
                f"cron '{expr}': @reboot is not a schedule; start the command with the service"
            )
        if text.lower() not in _ALIASES:
            known = ", ".join(_ALIASES)
            raise ConfigError(f"cron '{expr}': unknown alias, use one of {known}")
        text = _ALIASES[text.lower()]
    if "?" in text:
        raise ConfigError(f"cron '{expr}': '?' is Quartz syntax, not crontab; write '*' instead")
    parts = text.split()
    if len(parts) not in (5, 6):
        raise ConfigError(
            f"cron '{expr}': expected 5 fields (or 6 with seconds first), got {len(parts)}"
        )
    return parts


class _CronSchedule:
    """A crontab(5) expression evaluated in one timezone, following cron(8) across DST.

    cronsim does the calendar matching. Around DST it is trusted only where it matches
    cron(8), and the other two cases are routed around it:

    * A fixed time (neither minute nor hour starts with ``*``) goes to cronsim as a 5-field
      expression in the job's zone, the one case where cronsim applies Debian cron's rule (a
      time skipped by spring-forward runs once at the jump, a repeated one runs once, the
      first time). cronsim drops that rule for 6-field expressions, yet a seconds field
      changes nothing about which minutes should fire, so we expand the seconds field
      ourselves within each minute cronsim finds, adding the seconds in UTC (a skipped
      ``0 30 2 * * *`` still fires once, at the jump).
    * A wall-clock job (minute or hour starts with ``*``) fires at every instant whose local
      time matches. cronsim gets that wrong near a change: it steps hours as if offsets only
      moved by whole hours (Lord Howe's 30-minute shift loses whole hours of ``* 3 * * *``),
      it lands on non-existent midnights in zones that change at 00:00 (Santiago, Havana,
      Cairo), and ``* 3 * * *`` in Pacific/Chatham's fall-back never returns at all. So we
      give it one fixed UTC offset at a time, where its arithmetic is exact, and move to the
      next offset whenever a change falls before the firing it found.
    """

    def __init__(self, expr: str, timezone: str) -> None:
        parts = _split(expr)
        seconds: tuple[int, ...] | None = None
        try:
            if len(parts) == 6:
                seconds = tuple(sorted(_field_values(_SECONDS_FIELD, parts[0])))
                parts = parts[1:]
            for spec, text in zip(_MINUTE_LEVEL_FIELDS, parts, strict=True):
                _field_values(spec, text)
        except _FieldError as exc:
            raise ConfigError(f"cron '{expr}': {exc}") from None
        self._expr = expr
        self._timezone = timezone
        self._tz = zone(timezone)
        self._minute_expr = " ".join(parts)
        self._seconds = seconds
        self._wall_clock = parts[0].startswith("*") or parts[1].startswith("*")
        try:
            first = self.next_after(_PROBE_FROM)
        except CronSimError:  # its only remaining complaint: a day no chosen month has
            first = None
        if first is None:
            raise ConfigError(f"cron '{expr}': schedule never fires")

    def _next_fixed(self, after: datetime) -> datetime | None:
        """cronsim's "after" is local wall-clock time for a fixed time: started in the second
        pass of a repeated hour it offers that hour's first pass, which is earlier. Skipping
        those keeps "strictly after" true."""
        for fire in CronSim(self._minute_expr, after.astimezone(self._tz)):
            fire_utc = fire.astimezone(UTC)
            if fire_utc > after:
                return fire_utc
        return None

    def _next_wall_clock(self, after: datetime) -> datetime | None:
        start, probe = after, after
        while True:
            fixed = fixed_offset(_offset(self._tz, probe))
            fire = next(CronSim(self._minute_expr, start.astimezone(fixed)), None)
            if fire is None:
                return None
            change = _offset_change(self._tz, probe, fire)
            if change is None:
                return fire.astimezone(UTC)
            # Nothing matched under the old offset before the change; go on under the new one,
            # one second early so that a firing at the change itself is found.
            start, probe = change - _ONE_SECOND, change

    def _minute_fires(self, after: datetime) -> Iterator[datetime]:
        """Minute-level firings in UTC strictly after ``after``, in order."""
        next_minute = self._next_wall_clock if self._wall_clock else self._next_fixed
        while (fire := next_minute(after)) is not None:
            yield fire
            after = fire

    def next_after(self, moment: datetime) -> datetime | None:
        _require_aware(moment, "moment")
        if self._seconds is None:
            return next(self._minute_fires(moment), None)
        # A firing after `moment` may lie in the minute `moment` is in; start a minute early.
        for minute in self._minute_fires(moment - _ONE_MINUTE):
            for second in self._seconds:
                fire = minute + timedelta(seconds=second)
                if fire > moment:
                    return fire
        return None

    def describe(self) -> str:
        return f"cron '{self._expr}' {self._timezone}"

    @property
    def min_period(self) -> float | None:
        return 60.0 if self._seconds is None else 1.0

    def crontab(self) -> tuple[str, str] | None:
        if self._seconds not in (None, (0,)):
            return None
        return self._minute_expr, self._timezone


def cron_schedule(expr: str, timezone: str) -> Schedule:
    """A crontab(5) schedule in ``timezone``; every mistake is a one-line ConfigError."""
    return _CronSchedule(expr, timezone)


# --------------------------------------------------------------------------- every, at


class _EverySchedule:
    """Whole multiples of an interval since an anchor, in integer seconds.

    Plain arithmetic, so 10,000 jobs cost nothing to schedule, and so two replicas that
    started at different times still agree on every instant.
    """

    def __init__(self, interval: int, anchor: datetime | None) -> None:
        self._interval = interval
        self._anchor = anchor
        self._anchor_seconds = 0 if anchor is None else (anchor - _EPOCH) // _ONE_SECOND

    def next_after(self, moment: datetime) -> datetime | None:
        _require_aware(moment, "moment")
        # Fire times are whole seconds, so "after moment" is "after the second it is in".
        since_anchor = (moment - _EPOCH) // _ONE_SECOND - self._anchor_seconds
        fire = self._anchor_seconds + (since_anchor // self._interval + 1) * self._interval
        try:
            return _EPOCH + timedelta(seconds=fire)
        except OverflowError:
            return None

    def describe(self) -> str:
        text = f"every {format_duration(self._interval)}"
        if self._anchor is not None:
            text += f" from {iso_z(self._anchor)}"
        return text

    @property
    def min_period(self) -> float | None:
        return float(self._interval)

    def crontab(self) -> tuple[str, str] | None:
        minutes, hours = self._interval // 60, self._interval // 3600
        if self._anchor is not None or self._interval % 60:
            return None
        if minutes < 60 and 60 % minutes == 0:
            return f"*/{minutes} * * * *", "UTC"
        if self._interval % 3600 == 0 and 24 % hours == 0:
            return f"0 */{hours} * * *", "UTC"
        return None


def every_schedule(seconds: float, anchor: datetime | None = None) -> Schedule:
    """Every ``seconds`` (a whole number, at least 1) since the Unix epoch or ``anchor``.

    Fractions are refused rather than rounded: a run ID has whole seconds, so ``1.5s`` could
    not name its firings, and rounding it would run the job at a rate nobody asked for.
    An anchor's fraction of a second is dropped for the same reason.
    """
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds != int(seconds)
        or seconds < 1
    ):
        shown = f"{seconds:g}s" if isinstance(seconds, int | float) else repr(seconds)
        raise ConfigError(f"every must be a whole number of seconds, at least 1s, got {shown}")
    if anchor is not None:
        _require_aware(anchor, "anchor", ConfigError)
        anchor = anchor.astimezone(UTC).replace(microsecond=0)
    return _EverySchedule(int(seconds), anchor)


class _AtSchedule:
    """A single firing."""

    def __init__(self, moment: datetime) -> None:
        self._moment = moment

    def next_after(self, moment: datetime) -> datetime | None:
        _require_aware(moment, "moment")
        return self._moment if self._moment > moment else None

    def describe(self) -> str:
        return f"at {iso_z(self._moment)}"

    @property
    def min_period(self) -> float | None:
        return None

    def crontab(self) -> tuple[str, str] | None:
        return None


def at_schedule(moment: datetime) -> Schedule:
    """Once, at ``moment`` (aware), truncated to the second so its run ID names it exactly."""
    _require_aware(moment, "at", ConfigError)
    return _AtSchedule(moment.astimezone(UTC).replace(microsecond=0))


# --------------------------------------------------------------------------- helpers


def _require_aware(moment: datetime, what: str, error: type[Exception] = ValueError) -> None:
    """Refuse naive datetimes: Python would read them in the host's zone, which replicas
    do not share."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise error(f"{what} needs a timezone (Z or +01:00), got naive {moment.isoformat()}")


def _offset(tz: ZoneInfo, moment: datetime) -> timedelta:
    return moment.astimezone(tz).utcoffset() or timedelta(0)


def _offset_change(tz: ZoneInfo, start: datetime, end: datetime) -> datetime | None:
    """The first instant in (start, end] where ``tz``'s UTC offset differs from its offset at
    ``start``; None if it holds throughout.

    zoneinfo does not publish its transitions, so look a day at a time (no zone changes
    twice in a day) and bisect the day that changed down to the second, the resolution of
    tzdata. A call for a firing a minute away costs one lookup.
    """
    offset = _offset(tz, start)
    low = start
    while low < end:
        high = min(low + _ONE_DAY, end)
        if _offset(tz, high) != offset:
            # Whole epoch seconds: offsets change on whole seconds, and integers halve exactly.
            old = (low - _EPOCH) // _ONE_SECOND
            new = -((_EPOCH - high) // _ONE_SECOND)
            while new - old > 1:
                middle = (old + new) // 2
                if _offset(tz, _EPOCH + timedelta(seconds=middle)) == offset:
                    old = middle
                else:
                    new = middle
            return _EPOCH + timedelta(seconds=new)
        low = high
    return None


@functools.cache
def _zone_names() -> dict[str, str]:
    """Known zone names by lower case; scanning tzdata is slow, and only typos need it."""
    return {name.lower(): name for name in available_timezones()}


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or a ConfigError that suggests the closest real name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    names = _zone_names()
    close = [name.lower()] if name.lower() in names else []
    close += difflib.get_close_matches(name.lower(), names, n=1)
    if close:
        raise ConfigError(f"unknown timezone '{name}' (did you mean {names[close[0]]}?)")
    raise ConfigError(f"unknown timezone '{name}': use an IANA name such as Europe/Berlin or UTC")


def run_id(job: str, scheduled_at: datetime) -> str:
    """``job@2026-12-01T01:30:00Z``: the same on every replica, and distinct for the two
    passes of a repeated wall-clock hour, because it is written in UTC."""
    _require_aware(scheduled_at, "scheduled_at")
    return f"{job}@{iso_z(scheduled_at)}"


def manual_run_id(job: str) -> str:
    """A run ID no schedule can produce, so a manual run never satisfies a scheduled one."""
    return f"{job}@manual-{uuid.uuid4()}"


def fire_times(schedule: Schedule, start: datetime, count: int) -> list[datetime]:
    """The next ``count`` firings strictly after ``start`` (fewer if the schedule ends)."""
    times: list[datetime] = []
    moment = start
    for _ in range(count):
        fire = schedule.next_after(moment)
        if fire is None:
            break
        times.append(fire)
        moment = fire
    return times


def fires_between(
    schedule: Schedule, after: datetime, until: datetime, limit: int
) -> list[datetime]:
    """The firings in ``(after, until]``, oldest first; ConfigError when there are more than
    ``limit`` (a range that large is a typo, and walking it would stall the caller)."""
    times: list[datetime] = []
    moment = after
    while (fire := schedule.next_after(moment)) is not None and fire <= until:
        if len(times) == limit:
            raise ConfigError(
                f"more than {limit} firings between {iso_z(after)} and {iso_z(until)}"
            )
        times.append(fire)
        moment = fire
    return times
