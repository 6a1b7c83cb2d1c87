"""The time logic of pipeline cron schedules, with no database.

A schedule is a 5-field cron expression (minute hour day month weekday, croniter's syntax:
lists, ranges, steps, MON/JAN names, L, W, #, ?) or one of the aliases in `ALIASES`, read in an
IANA time zone. Its ticks are the instants it fires at: aware UTC datetimes on whole minutes.
A tick is the idempotency key of the build it starts (`tick.isoformat()`), so one tick is
always computed as the same value.

Beat asks `due_tick(cron, zone, after, now)` with `after` = max(the schedule's creation, its
last fired tick): the latest tick in (after, now], or None. Ticks missed while beat was down
therefore give one catch-up build (the latest of them), and a schedule never fires for a tick
from before it existed.

Daylight saving time is handled as cronie (Vixie cron) handles it. croniter matches wall-clock
times in naive local time; each match is then placed in the zone:

- an ordinary wall time is one instant;
- a wall time skipped by the clock jumping forward (02:30 on 2026-03-29 in Europe/Berlin,
  02:00 CET -> 03:00 CEST): a fixed-time schedule fires at the first instant after the gap
  (03:00 CEST), so "30 2 * * *" still runs once that day; a wildcard schedule skips it, so
  "0 * * * *" fires 23 times that day;
- a wall time repeated by the clock going back (02:30 on 2026-10-25 in Europe/Berlin,
  03:00 CEST -> 02:00 CET): a fixed-time schedule fires at the first pass only (02:30 CEST);
  a wildcard schedule fires on both passes, so "0 * * * *" fires 25 times that day, once an
  hour of real time.

A schedule is wildcard when its minute or hour field starts with "*" ("* * * * *",
"*/15 9 * * *", "0 * * * *", @hourly), as in cronie; else it is fixed-time ("30 2 * * *",
"0 9-17 * * 1-5", @daily). An instant is one tick however many wall times land on it (all of
a gap's fixed-time matches fire together at its end), so no tick fires twice.

Why not croniter's own time zone support: croniter 7.0.0, given zoneinfo datetimes, moves a
skipped fixed time to the end of the gap and fires hourly schedules 23 and 25 times as above,
but it fires a fixed time in the repeated hour twice ("30 2 * * *" at 02:30 CEST and again at
02:30 CET in Berlin, "30 1 * * *" at 01:30 EDT and 01:30 EST in New York). Refused as well,
because croniter reads them unlike cron: an equal range ("9-9", which croniter takes as the
whole cycle, every hour) and the random R (a different tick each time it is computed).
"""

import functools
import re
import zoneinfo
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import CroniterBadDateError, CroniterError, croniter

MAX_CRON_LENGTH = 200

# Each alias as the 5 fields it stands for, so that it is checked and computed like them.
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_SHOWN_LENGTH = 60  # of a refused value, in its message
_FIELD = re.compile(r"\S+", re.ASCII)  # croniter's split: only ASCII whitespace separates
_HASHED = re.compile(r"^[hr](\(\d+-\d+\))?(/\d+)?$", re.IGNORECASE)
_RANGE = re.compile(r"^(\w+)-(\w+)(/\d+)?$")
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_NAMES = {
    3: {name: index + 1 for index, name in enumerate(_MONTHS)},
    4: {name: index for index, name in enumerate(_WEEKDAYS)},
}
_PROBE_FROM = datetime(2000, 1, 1)
_MINUTE = timedelta(minutes=1)
_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class _Schedule:
    expression: str  # 5 fields
    zone: zoneinfo.ZoneInfo
    wildcard: bool  # cronie's MIN_STAR or HR_STAR


def validate(cron: str, timezone: str) -> str | None:
    """Why the schedule is refused, or None if it is fine. The cron is checked first."""
    try:
        _expression(cron)
    except ValueError as refused:
        return str(refused)
    if isinstance(timezone, str) and timezone in _zone_names():
        return None
    return f"timezone: {_shown(timezone)} is not an IANA time zone"


def latest_tick(cron: str, timezone: str, now: datetime) -> datetime:
    """The most recent tick at or before `now`."""
    _require_aware("now", now)
    return _nearest(_schedule(cron, timezone), now, backward=True)


def due_tick(cron: str, timezone: str, after: datetime, now: datetime) -> datetime | None:
    """The tick to fire now: the latest tick t with after < t <= now, or None."""
    _require_aware("after", after)
    tick = latest_tick(cron, timezone, now)
    return tick if tick > after else None


def next_tick(cron: str, timezone: str, after: datetime) -> datetime:
    """The first tick after `after`."""
    _require_aware("after", after)
    return _nearest(_schedule(cron, timezone), after, backward=False)


@functools.lru_cache(maxsize=1024)
def _schedule(cron: str, timezone: str) -> _Schedule:
    """The parsed schedule; ValueError with `validate`'s message if it is refused."""
    problem = validate(cron, timezone)
    if problem is not None:
        raise ValueError(problem)
    expression = _expression(cron)
    minute, hour = expression.split()[:2]
    return _Schedule(
        expression, zoneinfo.ZoneInfo(timezone), minute.startswith("*") or hour.startswith("*")
    )


def _expression(cron: str) -> str:
    """The 5 fields `cron` stands for, or ValueError saying why it is not a cron expression."""
    try:
        if not isinstance(cron, str):
            raise ValueError("not a string")
        if len(cron) > MAX_CRON_LENGTH:
            raise ValueError(f"too long ({len(cron)} characters, at most {MAX_CRON_LENGTH})")
        fields = _fields(cron)
        for field in fields:
            _check_deterministic(field)
        expression = " ".join(fields)
        _check_croniter(expression)
        for index, field in enumerate(fields):
            _check_ranges(index, field)
        _check_fires(expression)
    except ValueError as refused:
        raise ValueError(
            f"cron: {_shown(cron)} is not a cron expression (minute hour day month weekday): "
            f"{refused}"
        ) from None
    return expression


def _fields(cron: str) -> list[str]:
    words = _FIELD.findall(cron)
    if not words:
        raise ValueError("empty")
    if len(words) == 1 and words[0].startswith("@"):
        if words[0].lower() not in ALIASES:
            raise ValueError(f"not a time alias; the aliases are {', '.join(ALIASES)}")
        return ALIASES[words[0].lower()].split()
    if len(words) in (6, 7):
        # croniter would read a 6th field as seconds and a 7th as years.
        raise ValueError(f"{len(words)} fields; seconds and years are not supported")
    if len(words) != 5:
        raise ValueError(f"5 fields expected, not {len(words)}")
    return words


def _check_deterministic(field: str) -> None:
    # croniter draws R anew each time it reads the expression (H needs a hash id).
    if _HASHED.match(field):
        raise ValueError(
            f"{field!r}: hashed (H) and random (R) values are not supported; "
            "a schedule must give the same ticks each time they are computed"
        )


def _check_ranges(index: int, field: str) -> None:
    """Refuse "9-9": cron reads it as 9, croniter as the whole cycle (every hour)."""
    for item in field.split(","):
        bounds = _RANGE.match(item)
        if bounds and _value(index, bounds[1]) == _value(index, bounds[2]):
            raise ValueError(
                f"{item!r}: a range from a value to itself would be read as the whole "
                f"cycle; write {bounds[1]!r}"
            )


def _value(index: int, text: str) -> int | str:
    text = text.lower()
    if text.isdigit():
        return int(text)
    return _NAMES.get(index, {}).get(text, text)


def _check_croniter(expression: str) -> None:
    try:
        # strict: refuse days their months never have, "0 0 30 2 *"
        croniter.expand(expression, strict=True)
    except CroniterError as refused:
        lines = str(refused).strip().splitlines()  # a wrapped error is a whole traceback
        raise ValueError(lines[-1] if lines else type(refused).__name__) from None


def _check_fires(expression: str) -> None:
    try:
        croniter(expression, _PROBE_FROM).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError("it never fires") from None


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _shown(value: object) -> str:
    if isinstance(value, str) and len(value) > _SHOWN_LENGTH:
        return repr(value[:_SHOWN_LENGTH]) + f"... ({len(value)} characters)"
    return repr(value)


def _require_aware(name: str, value: datetime) -> None:
    # A naive datetime would silently be read in the server's own time zone.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, not {value!r}")


def _nearest(schedule: _Schedule, instant: datetime, *, backward: bool) -> datetime:
    """The latest tick at or before `instant` (backward), else the first tick after it.

    Matches are walked in wall-clock order, which is the order of their ticks except inside a
    repeated hour: there a first pass is earlier than the second pass of an earlier wall time.
    So the walk starts a repeat's length beyond the instant's own wall time, and goes on a
    repeat's length past the first match that gives a tick.
    """
    zone = schedule.zone
    wall = _wall(instant, zone)
    step = -1 if backward else 1
    start = wall - step * _repeat(wall, zone)
    wanted: Callable[[datetime], bool] = (
        (lambda tick: tick <= instant) if backward else (lambda tick: tick > instant)
    )
    pick = max if backward else min
    best, bound = None, None
    for match in _matches(schedule.expression, start, backward=backward):
        if bound is not None and (match < bound if backward else match > bound):
            break
        ticks = [tick for tick in _ticks(match, schedule) if wanted(tick)]
        if not ticks:
            continue
        best = pick(ticks if best is None else [best, *ticks])
        if bound is None:
            bound = match + step * _repeat(match, zone)
            if bound == match:  # not in a repeated hour: no later match can do better
                break
    assert best is not None  # croniter raises rather than running out of matches
    return best


def _matches(expression: str, start: datetime, *, backward: bool) -> Iterator[datetime]:
    """The naive wall-clock times `expression` matches from `start` (included) on."""
    if backward:
        return croniter(expression, start + _MINUTE).all_prev(datetime)
    return croniter(expression, start - _MINUTE).all_next(datetime)


def _ticks(wall: datetime, schedule: _Schedule) -> tuple[datetime, ...]:
    """The instants a wall-clock match fires at, by the rules in the module docstring."""
    first = wall.replace(tzinfo=schedule.zone, fold=0)
    second = wall.replace(tzinfo=schedule.zone, fold=1)
    if not _exists(first):  # skipped by the clock jumping forward
        return () if schedule.wildcard else (_gap_end(first, second),)
    if first.utcoffset() == second.utcoffset() or not schedule.wildcard:
        return (_utc(first),)
    return (_utc(first), _utc(second))  # repeated by the clock going back


def _wall(instant: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The naive wall-clock minute `instant` falls in."""
    return instant.astimezone(zone).replace(tzinfo=None, fold=0, second=0, microsecond=0)


def _repeat(wall: datetime, zone: zoneinfo.ZoneInfo) -> timedelta:
    """How far the clock went back if `wall` happens twice, else zero."""
    first = wall.replace(tzinfo=zone, fold=0)
    if not _exists(first):
        return timedelta(0)
    return first.utcoffset() - wall.replace(tzinfo=zone, fold=1).utcoffset()


def _exists(local: datetime) -> bool:
    there_and_back = local.astimezone(UTC).astimezone(local.tzinfo)
    return there_and_back.replace(tzinfo=None) == local.replace(tzinfo=None)


def _gap_end(first: datetime, second: datetime) -> datetime:
    """The instant the clock jumped over the wall time of `first` and `second` (fold 0, 1).

    In a gap fold 1 reads the wall time with the offset from after the jump, which lands
    before the jump, and fold 0 with the one from before, which lands after it: bisect
    between them, to the second, for the first instant with the new offset.
    """
    before, after = second.astimezone(UTC), first.astimezone(UTC)
    offset = after.astimezone(first.tzinfo).utcoffset()
    while after - before > _SECOND:
        middle = before + (after - before) // _SECOND // 2 * _SECOND
        if middle.astimezone(first.tzinfo).utcoffset() == offset:
            after = middle
        else:
            before = middle
    return _utc(after)


def _utc(local: datetime) -> datetime:
    # Every offset in use since 1972 is whole minutes, so this drops nothing for today's
    # ticks; it keeps older ones (local mean time) on whole minutes too.
    return local.astimezone(UTC).replace(second=0, microsecond=0)
