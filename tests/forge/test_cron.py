"""A schedule's ticks: validation, the latest tick and the one due, at most one catch-up,
and DST changes in the schedule's zone (each tick fires once, none twice)."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine

from forge import cron

BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("expression", "zone", "refusal"),
    [
        ("0 3 * * *", "Europe/Berlin", None),
        ("*/15 9-17 * * MON-FRI", "UTC", None),
        ("@daily", "America/New_York", None),
        ("61 * * * *", "UTC", "is not a cron expression"),
        ("0 0 * * * *", "UTC", "five fields"),
        ("@reboot", "UTC", "is not one of"),
        ("", "UTC", "empty"),
        ("* " * 500, "UTC", "longer than"),
        ("0 3 * * *", "Mars/Base", "not an IANA time zone"),
    ],
)
def test_validation(expression, zone, refusal):
    why = cron.validate(expression, zone)
    assert (why is None) if refusal is None else (refusal in why)


def fired_between(expression: str, zone: str, start: datetime, hours: int) -> list[datetime]:
    """What a sweep each minute from `start` fires, each fired tick becoming `after`."""
    fired, after, now = [], start, start
    while now < start + timedelta(hours=hours):
        if tick := cron.due_tick(expression, zone, after, now):
            fired.append(tick)
            after = tick
        now += timedelta(minutes=1)
    return fired


def local(ticks: list[datetime]) -> list[str]:
    return [t.astimezone(BERLIN).strftime("%d %H:%M%z") for t in ticks]


def test_only_the_latest_missed_tick_fires_and_none_before_the_schedule():
    with time_machine.travel(datetime(2026, 6, 10, 12, 0, tzinfo=UTC), tick=False):
        now = datetime.now(UTC)
        three_days_ago = now - timedelta(days=3)
        tick = cron.due_tick("0 3 * * *", "Europe/Berlin", three_days_ago, now)
        assert tick == datetime(2026, 6, 10, 1, 0, tzinfo=UTC)  # today's 03:00 CEST
        assert cron.due_tick("0 3 * * *", "Europe/Berlin", tick, now) is None
        created_after_tick = datetime(2026, 6, 10, 2, 0, tzinfo=UTC)
        assert cron.due_tick("0 3 * * *", "Europe/Berlin", created_after_tick, now) is None
    assert cron.next_tick("0 3 * * *", "Europe/Berlin", tick) == tick + timedelta(days=1)


def test_ticks_are_whole_minutes_in_utc_and_stable():
    now = datetime(2026, 6, 10, 12, 34, 56, 789, tzinfo=UTC)
    first = cron.latest_tick("*/5 * * * *", "Asia/Kolkata", now)
    assert first == cron.latest_tick("*/5 * * * *", "Asia/Kolkata", now)
    assert (first.tzinfo, first.second, first.microsecond) == (UTC, 0, 0)
    assert first == datetime(2026, 6, 10, 12, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # 02:30 does not exist on 29 March: it fires once, as the clock reads an hour later.
        ("30 2 * * *", ["29 03:30+0200", "30 02:30+0200"]),
        ("0 3 * * *", ["29 03:00+0200", "30 03:00+0200"]),
    ],
)
def test_spring_forward_fires_each_day_once(expression, expected):
    assert (
        local(fired_between(expression, "Europe/Berlin", datetime(2026, 3, 28, 20, tzinfo=UTC), 30))
        == expected
    )


def test_fall_back_fires_a_repeated_time_once_at_its_first_occurrence():
    ticks = fired_between("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 20, tzinfo=UTC), 31)
    assert local(ticks) == ["25 02:30+0200", "26 02:30+0100"]


@pytest.mark.parametrize(
    ("zone", "start", "hours_of_day"),
    [
        ("Europe/Berlin", datetime(2026, 3, 28, 23, tzinfo=UTC), 23),  # 29 March local day
        ("Europe/Berlin", datetime(2026, 10, 24, 22, tzinfo=UTC), 24),  # 25 October
        ("America/New_York", datetime(2026, 3, 8, 5, tzinfo=UTC), 23),
        ("America/New_York", datetime(2026, 11, 1, 4, tzinfo=UTC), 24),
    ],
)
def test_hourly_across_a_change_fires_no_instant_twice(zone, start, hours_of_day):
    ticks = fired_between("0 * * * *", zone, start - timedelta(minutes=1), 25)
    day = start.astimezone(ZoneInfo(zone)).date()
    of_the_day = [t for t in ticks if t.astimezone(ZoneInfo(zone)).date() == day]
    assert len(set(ticks)) == len(ticks)
    assert ticks == sorted(ticks)
    # Every whole local hour that exists fires; a repeated one once.
    assert len(of_the_day) == hours_of_day
