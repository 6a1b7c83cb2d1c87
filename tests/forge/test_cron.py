"""forge.cron: which schedules are refused, the latest, due and next ticks, at most one
catch-up, and DST changes in the schedule's zone swept by a beat (each tick fires once, none
twice). Plain functions of time: no database."""

import random
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from hypothesis import given, settings
from hypothesis import strategies as st

from forge import cron

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"
LORD_HOWE = "Australia/Lord_Howe"
SAO_PAULO = "America/Sao_Paulo"
NOT_CRON = "is not a cron expression (minute hour day month weekday): "


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(tick: datetime, zone: str) -> str:
    return tick.astimezone(ZoneInfo(zone)).strftime("%H:%M%Z")


def local_day(day: date, zone: str) -> tuple[datetime, datetime]:
    """The instants the local day begins and ends at (23 to 25 hours apart)."""

    def begins(of: date) -> datetime:
        return datetime.combine(of, time(), tzinfo=ZoneInfo(zone)).astimezone(UTC)

    return begins(day), begins(day + timedelta(days=1))


# Validation


@pytest.mark.parametrize(
    ("expression", "zone"),
    [
        ("0 3 * * *", BERLIN),
        ("*/15 9-17 * * MON-FRI", "UTC"),
        ("0 0 1 JAN,jul *", "Etc/UTC"),
        ("30 2 * * sun", NEW_YORK),
        ("0 22-2 * * *", "Asia/Kolkata"),  # croniter's wrap-around range: 22, 23, 0, 1, 2
        ("0 0 L * *", "UTC"),
        ("0 0 15W * *", "UTC"),
        ("0 0 * * 5#3", "UTC"),
        ("0 0 ? * MON", "UTC"),
        ("0 0 29 2 *", "UTC"),  # leap days only
        ("  0  3 * *\t* ", "UTC"),
        *((alias, "UTC") for alias in cron.ALIASES),
        ("@DAILY", "UTC"),
    ],
)
def test_a_good_schedule_is_accepted(expression, zone):
    assert cron.validate(expression, zone) is None


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("61 * * * *", "[61 * * * *] is not acceptable, out of range"),
        ("0 24 * * *", "[0 24 * * *] is not acceptable, out of range"),
        ("*/0 * * * *", "[*/0 * * * *] step '0' in field 0 is not acceptable"),
        ("0 0 * * * *", "6 fields; seconds and years are not supported"),
        ("0 0 0 * * * 2026", "7 fields; seconds and years are not supported"),
        ("0 3 * *", "5 fields expected, not 4"),
        ("garbage", "5 fields expected, not 1"),
        ("0 0 * * *\n0 1 * * *", "5 fields expected, not 10"),
        ("0\xa00 * * * *", "[0\xa00 * * * *] is not acceptable"),  # cron splits on ASCII only
        ("a b c d e", "[a b c d e] is not acceptable"),
        ("", "empty"),
        (" \t ", "empty"),
        ("@reboot", f"not a time alias; the aliases are {', '.join(cron.ALIASES)}"),
        ("@fortnightly", f"not a time alias; the aliases are {', '.join(cron.ALIASES)}"),
        (
            "R * * * *",
            "'R': hashed (H) and random (R) values are not supported; "
            "a schedule must give the same ticks each time they are computed",
        ),
        (
            "0 H * * *",
            "'H': hashed (H) and random (R) values are not supported; "
            "a schedule must give the same ticks each time they are computed",
        ),
        (
            "0 9-9 * * *",
            "'9-9': a range from a value to itself would be read as the whole cycle; write '9'",
        ),
        (
            "0 0 1 jan-JAN *",
            "'jan-JAN': a range from a value to itself would be read as the whole cycle; "
            "write 'jan'",
        ),
        (
            "0 0 30 2 *",
            "[0 0 30 2 *] is not acceptable. Day(s) [30] can never occur in month(s) [2]",
        ),
        ("0 0 15W * 6#5", "it never fires"),  # a weekday that is a fifth Saturday
    ],
)
def test_a_bad_cron_is_refused_saying_why(expression, reason):
    assert cron.validate(expression, "UTC") == f"cron: {expression!r} {NOT_CRON}{reason}"


def test_a_huge_cron_is_refused_in_a_short_message():
    huge = "* " * 50_000
    why = cron.validate(huge, "UTC")
    assert why == (
        f"cron: {huge[:60]!r}... (100000 characters) {NOT_CRON}"
        "too long (100000 characters, at most 200)"
    )


def test_not_a_string_is_refused():
    assert cron.validate(None, "UTC") == f"cron: None {NOT_CRON}not a string"
    assert cron.validate("@daily", None) == "timezone: None is not an IANA time zone"


@pytest.mark.parametrize(
    "zone", ["Mars/Base", "", "utc", "Europe/berlin", "+02:00", "CEST", "../etc/passwd"]
)
def test_an_unknown_zone_is_refused(zone):
    assert cron.validate("0 3 * * *", zone) == f"timezone: {zone!r} is not an IANA time zone"


def test_a_huge_zone_is_refused_in_a_short_message():
    why = cron.validate("0 3 * * *", "Europe/" * 1000)
    assert why.startswith("timezone: 'Europe/Europe/")
    assert len(why) < 120


def test_the_cron_is_reported_before_the_zone():
    assert cron.validate("61 * * * *", "Mars/Base").startswith("cron: '61 * * * *' ")


def test_a_refused_schedule_or_a_naive_time_has_no_ticks():
    now = utc(2026, 6, 10, 12)
    with pytest.raises(ValueError, match=r"^timezone: 'Mars/Base' is not an IANA time zone$"):
        cron.latest_tick("0 3 * * *", "Mars/Base", now)
    with pytest.raises(ValueError, match=r"^cron: '@reboot' is not a cron expression"):
        cron.next_tick("@reboot", "UTC", now)
    with pytest.raises(ValueError, match=r"^now must be an aware datetime"):
        cron.latest_tick("0 3 * * *", BERLIN, datetime(2026, 6, 10, 12))
    with pytest.raises(ValueError, match=r"^after must be an aware datetime"):
        cron.due_tick("0 3 * * *", BERLIN, datetime(2026, 6, 10), now)


# Ordinary days


def test_latest_due_and_next_on_an_ordinary_day():
    with time_machine.travel(utc(2026, 6, 10, 12, 34, 56), tick=False):
        now = datetime.now(UTC)
        today = utc(2026, 6, 10, 1)  # 03:00 CEST
        assert cron.latest_tick("0 3 * * *", BERLIN, now) == today
        assert cron.next_tick("0 3 * * *", BERLIN, now) == today + timedelta(days=1)
        assert cron.due_tick("0 3 * * *", BERLIN, now - timedelta(hours=12), now) == today
        assert cron.due_tick("0 3 * * *", BERLIN, today, now) is None


def test_a_tick_is_at_or_before_now_and_the_next_strictly_after():
    tick = utc(2026, 6, 10, 1)
    assert cron.latest_tick("0 3 * * *", BERLIN, tick) == tick
    assert cron.latest_tick("0 3 * * *", BERLIN, tick - timedelta(microseconds=1)) == tick - (
        timedelta(days=1)
    )
    assert cron.next_tick("0 3 * * *", BERLIN, tick - timedelta(microseconds=1)) == tick
    assert cron.next_tick("0 3 * * *", BERLIN, tick) == tick + timedelta(days=1)
    assert cron.due_tick("0 3 * * *", BERLIN, tick, tick) is None
    assert cron.due_tick("0 3 * * *", BERLIN, tick - timedelta(seconds=1), tick) == tick


@pytest.mark.parametrize(
    ("expression", "zone", "now", "latest", "following"),
    [
        # Friday evening: the weekday schedule's next tick is Monday morning.
        ("*/15 9-17 * * MON-FRI", "UTC", utc(2026, 6, 12, 17, 50), utc(2026, 6, 12, 17, 45),
         utc(2026, 6, 15, 9)),
        ("0 9 * * *", "Asia/Kolkata", utc(2026, 6, 10, 12), utc(2026, 6, 10, 3, 30),
         utc(2026, 6, 11, 3, 30)),
        ("@weekly", NEW_YORK, utc(2026, 6, 10, 12), utc(2026, 6, 7, 4), utc(2026, 6, 14, 4)),
        ("@monthly", "UTC", utc(2026, 6, 10, 12), utc(2026, 6, 1), utc(2026, 7, 1)),
        ("@yearly", BERLIN, utc(2026, 6, 10, 12), utc(2025, 12, 31, 23), utc(2026, 12, 31, 23)),
        ("0 0 29 2 *", "UTC", utc(2026, 6, 10), utc(2024, 2, 29), utc(2028, 2, 29)),
        ("0 0 L * *", "UTC", utc(2026, 2, 10), utc(2026, 1, 31), utc(2026, 2, 28)),
    ],
)  # fmt: skip
def test_latest_and_next(expression, zone, now, latest, following):
    assert cron.latest_tick(expression, zone, now) == latest
    assert cron.next_tick(expression, zone, now) == following


def test_ticks_are_whole_minutes_in_utc_and_always_the_same_value():
    first = cron.latest_tick("*/5 * * * *", "Asia/Kolkata", utc(2026, 6, 10, 12, 34, 56, 789))
    again = cron.latest_tick("*/5 * * * *", "Asia/Kolkata", utc(2026, 6, 10, 12, 31, 2))
    assert first == again == utc(2026, 6, 10, 12, 30)
    assert (first.tzinfo, first.second, first.microsecond) == (UTC, 0, 0)
    assert first.isoformat() == again.isoformat() == "2026-06-10T12:30:00+00:00"
    assert cron.next_tick("0 3 * * *", BERLIN, utc(2026, 6, 9, 7, 8, 9, 10)).isoformat() == (
        "2026-06-10T01:00:00+00:00"
    )


# The beat: at most one catch-up, nothing from before the schedule


def test_beat_down_three_days_fires_only_the_latest_missed_tick():
    created = utc(2026, 6, 6, 12)
    with time_machine.travel(utc(2026, 6, 7, 1, 0, 30), tick=False):  # the last beat
        fired = cron.due_tick("0 3 * * *", BERLIN, created, datetime.now(UTC))
        assert fired == utc(2026, 6, 7, 1)
    with time_machine.travel(utc(2026, 6, 10, 12), tick=False):  # back three days later
        now = datetime.now(UTC)
        caught_up = cron.due_tick("0 3 * * *", BERLIN, fired, now)
        assert caught_up == utc(2026, 6, 10, 1)  # not 8 or 9 June's
        assert cron.due_tick("0 3 * * *", BERLIN, caught_up, now) is None
    with time_machine.travel(utc(2026, 6, 11, 1, 1), tick=False):
        assert cron.due_tick("0 3 * * *", BERLIN, caught_up, datetime.now(UTC)) == utc(
            2026, 6, 11, 1
        )


def test_a_schedule_created_after_todays_tick_first_fires_tomorrow():
    created = utc(2026, 6, 10, 9, 15)  # today's 03:00 CEST was 01:00 UTC
    for moment in [utc(2026, 6, 10, 9, 16), utc(2026, 6, 10, 23, 59), utc(2026, 6, 11, 0, 59)]:
        with time_machine.travel(moment, tick=False):
            assert cron.due_tick("0 3 * * *", BERLIN, created, datetime.now(UTC)) is None
    with time_machine.travel(utc(2026, 6, 11, 1), tick=False):
        assert cron.due_tick("0 3 * * *", BERLIN, created, datetime.now(UTC)) == utc(2026, 6, 11, 1)


# DST: a beat each minute across the day of a change


def beat(expression: str, zone: str, day: date) -> list[datetime]:
    """What a beat across the local day fires, each fired tick becoming `after` (the schedule
    having been created just before the day began). It sweeps each minute until 06:00, past
    both zones' changes, then every 10 minutes: more often than any schedule tested ticks."""
    start, end = local_day(day, zone)
    after, fired = start - timedelta(seconds=30), []
    with time_machine.travel(start, tick=False) as traveller:
        while (now := datetime.now(UTC)) < end:
            if (tick := cron.due_tick(expression, zone, after, now)) is not None:
                assert after < tick <= now
                fired.append(tick)
                after = tick
            early = now.astimezone(ZoneInfo(zone)).hour < 6
            traveller.shift(timedelta(minutes=1 if early else 10))
    return fired


def hours(start: int, end: int, zone_name: str) -> list[str]:
    return [f"{hour:02}:00{zone_name}" for hour in range(start, end)]


SPRING_BERLIN, FALL_BERLIN = date(2026, 3, 29), date(2026, 10, 25)
SPRING_NEW_YORK, FALL_NEW_YORK = date(2026, 3, 8), date(2026, 11, 1)


@pytest.mark.parametrize(
    ("expression", "zone", "day", "expected"),
    [
        # 02:00 CET -> 03:00 CEST: 02:30 does not exist; a fixed time fires as the gap ends.
        ("30 2 * * *", BERLIN, SPRING_BERLIN, ["03:00CEST"]),
        ("0 2 * * *", BERLIN, SPRING_BERLIN, ["03:00CEST"]),
        ("0 3 * * *", BERLIN, SPRING_BERLIN, ["03:00CEST"]),
        ("30 1 * * *", BERLIN, SPRING_BERLIN, ["01:30CET"]),
        # A wildcard schedule skips the missing hour: 23 ticks, once an hour of real time.
        ("0 * * * *", BERLIN, SPRING_BERLIN, hours(0, 2, "CET") + hours(3, 24, "CEST")),
        ("*/15 2 * * *", BERLIN, SPRING_BERLIN, []),
        # 03:00 CEST -> 02:00 CET: 02:30 happens twice; a fixed time fires at the first.
        ("30 2 * * *", BERLIN, FALL_BERLIN, ["02:30CEST"]),
        ("0 2 * * *", BERLIN, FALL_BERLIN, ["02:00CEST"]),
        ("0 3 * * *", BERLIN, FALL_BERLIN, ["03:00CET"]),
        # A wildcard schedule fires on both passes: 25 ticks, once an hour of real time.
        ("0 * * * *", BERLIN, FALL_BERLIN,
         hours(0, 3, "CEST") + hours(2, 24, "CET")),
        ("*/15 2 * * *", BERLIN, FALL_BERLIN,
         ["02:00CEST", "02:15CEST", "02:30CEST", "02:45CEST",
          "02:00CET", "02:15CET", "02:30CET", "02:45CET"]),
        # New York changes at 02:00 -> 03:00 in March, 02:00 -> 01:00 in November.
        ("30 2 * * *", NEW_YORK, SPRING_NEW_YORK, ["03:00EDT"]),
        ("0 3 * * *", NEW_YORK, SPRING_NEW_YORK, ["03:00EDT"]),
        ("0 * * * *", NEW_YORK, SPRING_NEW_YORK, hours(0, 2, "EST") + hours(3, 24, "EDT")),
        ("30 1 * * *", NEW_YORK, FALL_NEW_YORK, ["01:30EDT"]),
        ("30 2 * * *", NEW_YORK, FALL_NEW_YORK, ["02:30EST"]),
        ("0 3 * * *", NEW_YORK, FALL_NEW_YORK, ["03:00EST"]),
        ("0 * * * *", NEW_YORK, FALL_NEW_YORK, hours(0, 2, "EDT") + hours(1, 24, "EST")),
        # Lord Howe moves its clock half an hour; Sao Paulo (2018) jumped over midnight.
        ("15 2 * * *", LORD_HOWE, date(2026, 10, 4), ["02:30+11"]),
        ("15 1 * * *", LORD_HOWE, date(2026, 4, 5), ["01:15+11"]),
        ("@daily", SAO_PAULO, date(2018, 11, 4), ["01:00-02"]),
    ],
)  # fmt: skip
def test_a_beat_across_a_change_fires_each_tick_once(expression, zone, day, expected):
    fired = beat(expression, zone, day)
    assert [local(tick, zone) for tick in fired] == expected
    assert len(set(fired)) == len(fired)
    # next_tick, for the admin, enumerates the same ticks.
    start, end = local_day(day, zone)
    listed, moment = [], start - timedelta(seconds=30)
    while (moment := cron.next_tick(expression, zone, moment)) < end:
        listed.append(moment)
    assert listed == fired


def test_in_the_repeated_hour_the_first_pass_of_a_later_time_is_the_nearer_tick():
    # Berlin 25 October: 02:00-03:00 CEST is 00:00-01:00 UTC, 02:00-03:00 CET 01:00-02:00.
    second_pass_0210 = utc(2026, 10, 25, 1, 10)  # 02:10 CET
    # 02:45 CEST came earlier than 02:10 CET, though it reads later on the clock.
    assert cron.latest_tick("45 2 * * *", BERLIN, second_pass_0210) == utc(2026, 10, 25, 0, 45)
    assert cron.latest_tick("*/15 * * * *", BERLIN, second_pass_0210) == utc(2026, 10, 25, 1)
    first_pass_0250 = utc(2026, 10, 25, 0, 50)  # 02:50 CEST
    assert cron.next_tick("*/15 * * * *", BERLIN, first_pass_0250) == utc(2026, 10, 25, 1)
    assert cron.next_tick("45 2 * * *", BERLIN, first_pass_0250) == utc(2026, 10, 26, 1, 45)
    assert cron.due_tick("45 2 * * *", BERLIN, utc(2026, 10, 25, 0, 45), second_pass_0210) is None


def test_a_beat_down_across_a_change_catches_up_once_with_the_latest_tick():
    down_since = utc(2026, 10, 24, 23, 30)  # 01:30 CEST
    back = utc(2026, 10, 25, 1, 40)  # 02:40 CET, on the second pass
    assert cron.due_tick("0 * * * *", BERLIN, down_since, back) == utc(2026, 10, 25, 1)
    assert cron.due_tick("30 2 * * *", BERLIN, down_since, back) == utc(2026, 10, 25, 0, 30)
    spring_back = utc(2026, 3, 29, 1, 5)  # 03:05 CEST
    assert cron.due_tick("30 2 * * *", BERLIN, utc(2026, 3, 28, 23), spring_back) == utc(
        2026, 3, 29, 1
    )


@pytest.mark.parametrize("expression", ["0 * * * *", "*/20 * * * *", "30 2 * * *", "0 3 * * *"])
def test_an_irregular_beat_across_a_change_never_fires_an_instant_twice(expression):
    sweeps = random.Random(expression)
    every = beat(expression, BERLIN, FALL_BERLIN)
    (now, end), fired = local_day(FALL_BERLIN, BERLIN), []
    after = now
    while (
        now := now + timedelta(minutes=sweeps.randint(1, 90), seconds=sweeps.randint(0, 59))
    ) < end:
        if (tick := cron.due_tick(expression, BERLIN, after, now)) is not None:
            fired.append(tick)
            after = tick
    assert fired == sorted(set(fired))
    assert set(fired) <= set(every)


# Instants the clock changes at, in their zones.
CHANGES = [
    (BERLIN, utc(2026, 3, 29, 1)),
    (BERLIN, utc(2026, 10, 25, 1)),
    (NEW_YORK, utc(2026, 3, 8, 7)),
    (NEW_YORK, utc(2026, 11, 1, 6)),
    (LORD_HOWE, utc(2026, 4, 4, 15)),
    (LORD_HOWE, utc(2026, 10, 3, 15, 30)),
    (SAO_PAULO, utc(2018, 11, 4, 3)),
    (SAO_PAULO, utc(2019, 2, 17, 2)),
]


@settings(max_examples=100, deadline=None)
@given(
    expression=st.sampled_from(
        ["* * * * *", "*/7 * * * *", "30 2 * * *", "15 1,2,3 * * *", "0 */2 * * *", "@daily"]
    ),
    change=st.sampled_from(CHANGES),
    offset=st.timedeltas(timedelta(hours=-4), timedelta(hours=4)),
)
def test_the_latest_and_next_ticks_agree_near_a_change(expression, change, offset):
    zone, now = change[0], change[1] + offset
    latest = cron.latest_tick(expression, zone, now)
    following = cron.next_tick(expression, zone, now)
    assert latest <= now < following
    assert cron.next_tick(expression, zone, latest) == following
    assert cron.latest_tick(expression, zone, following) == following
