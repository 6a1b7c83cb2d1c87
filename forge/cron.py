"""The ticks of a schedule's cron expression in its time zone (croniter for the expression).

Ticks are wall-clock times of the zone, turned into instants as cron daemons do across a
DST change:
- a wall time the spring change skips (02:30 on a day that jumps 02:00 -> 03:00) fires as
  the clock reads it an hour later (03:30), once, with the offset in force before the jump
  (zoneinfo's fold=0);
- a wall time the autumn change repeats (02:30 twice) fires once, at its first occurrence;
- two wall times that land on one instant (02:00 and 03:00 on the spring day) fire once: a
  tick is an instant (aware UTC, whole minutes), and the same instant is never due twice.
"""

from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

from croniter import croniter

MAX_EXPRESSION = 200
ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
FIELDS = "minute hour day month weekday"
MAX_STEPS = 1000  # ticks looked at to step over instants that do not qualify (DST)


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def validate(expression: str, timezone: str) -> str | None:
    """Why a schedule is refused, or None."""
    if not isinstance(expression, str) or not expression.strip():
        return f"cron: empty; five fields ({FIELDS}) or @daily, @hourly, ..."
    if len(expression) > MAX_EXPRESSION:
        return f"cron: longer than {MAX_EXPRESSION} characters"
    shown = expression.strip()
    if shown.startswith("@"):
        if shown.lower() not in ALIASES:
            return f"cron: {shown!r} is not one of {', '.join(sorted(ALIASES))}"
    elif len(shown.split()) != 5:
        return f"cron: {shown!r} is not a cron expression: five fields ({FIELDS})"
    elif not croniter.is_valid(shown, strict=True):
        return f"cron: {shown!r} is not a cron expression ({FIELDS})"
    if not isinstance(timezone, str) or timezone not in _zones():
        return f"timezone: {str(timezone)[:64]!r} is not an IANA time zone (Europe/Berlin, UTC)"
    return None


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant of a wall time of the zone (fold=0: a skipped time counts with the offset
    before the jump, a repeated one is its first occurrence)."""
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def latest_tick(expression: str, timezone: str, now: datetime) -> datetime:
    """The latest tick at or before `now`."""
    zone = ZoneInfo(timezone)
    start = _wall(now, zone).replace(second=0, microsecond=0) + timedelta(minutes=1)
    ticks = croniter(expression.strip(), start)
    for _ in range(MAX_STEPS):
        tick = _instant(ticks.get_prev(datetime), zone)
        if tick <= now:  # a skipped wall time may land after `now`: look further back
            return tick
    raise ValueError(f"no tick of {expression!r} found before {now}")


def next_tick(expression: str, timezone: str, after: datetime) -> datetime:
    """The first tick after `after`."""
    zone = ZoneInfo(timezone)
    ticks = croniter(expression.strip(), _wall(after, zone).replace(second=0, microsecond=0))
    for _ in range(MAX_STEPS):
        tick = _instant(ticks.get_next(datetime), zone)
        if tick > after:  # a repeated wall time maps back to its first occurrence
            return tick
    raise ValueError(f"no tick of {expression!r} found after {after}")


def due_tick(expression: str, timezone: str, after: datetime, now: datetime) -> datetime | None:
    """The tick to fire now: the latest with after < tick <= now, or None. `after` is the
    later of the schedule's creation and its last fired tick, so only the latest of the
    ticks missed meanwhile fires, and none from before the schedule existed."""
    tick = latest_tick(expression, timezone, now)
    return tick if tick > after else None
