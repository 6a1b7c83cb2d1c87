"""Cron schedules (forge.services.schedules) through the real PostgreSQL and real git: rows
kept in step with the YAML, one build per tick whatever fires it how often, only the latest
of the ticks missed, the schedule's variables, and the head of the branch asked of a real
git server (basic auth through ciproject.git's askpass), its failures recorded and retried.
The clock is moved with time_machine, within the days the variable partitions cover."""

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.utils import timezone

from builds.models import Build, BuildVariable
from builds.services import save_pipeline
from forge.models import Repository, Schedule
from forge.services import repositories, schedules
from tests import gitservers
from tests.support import make_pipeline
from vault import services as vault

pytestmark = pytest.mark.django_db

BERLIN = ZoneInfo("Europe/Berlin")
STAGES = """
stages:
  - name: s
    jobs:
      - {id: j, runs-on: unit-tests, steps: [{run: "true"}]}
"""
NIGHTLY = '{cron: "0 3 * * *", timezone: Europe/Berlin}'
CLONE_TOKEN = "clone-tok-8d1e5b"


def definition(*entries: str, head: str = "") -> str:
    return f"{head}schedules: [{', '.join(entries)}]\n{STAGES}"


# A day the partitions of build variables cover (made from now on when the database is).
DAY = datetime.now(BERLIN).date() + timedelta(days=2)


def berlin(days: int, hour: int, minute: int = 0) -> datetime:
    """`hour`:`minute` in Berlin, `days` after DAY."""
    return datetime.combine(DAY + timedelta(days=days), time(hour, minute), tzinfo=BERLIN)


def tick_of(days: int) -> datetime:
    """The instant of the 03:00 Berlin tick `days` after DAY."""
    return berlin(days, 3).astimezone(UTC)


def fire_at(moment: datetime) -> int:
    with time_machine.travel(moment, tick=False):
        return schedules.fire_due(timezone.now())


def key(schedule: Schedule, tick: datetime) -> str:
    return f"schedule:{schedule.pk}:{tick.isoformat()}"


def test_sync_keeps_the_rows_in_step_with_the_definition():
    with time_machine.travel(berlin(-1, 1), tick=False):
        pipeline = make_pipeline("nightly", definition(NIGHTLY))
        schedules.sync_definitions()
        schedules.sync_definitions()  # again: nothing changes
    [row] = Schedule.objects.all()
    assert (row.from_definition, row.cron, row.timezone, row.branch, row.variables) == (
        True, "0 3 * * *", "Europe/Berlin", "", {},
    )  # fmt: skip
    assert row.created_at == berlin(-1, 1)
    assert fire_at(berlin(0, 4)) == 1
    row.refresh_from_db()
    assert row.last_tick == tick_of(0)

    # Another definition with the same schedule: the row and its last tick stay.
    pipeline = save_pipeline("nightly", definition(NIGHTLY).replace('"true"', '"make"'), pipeline)
    schedules.sync_definitions()
    [kept] = Schedule.objects.all()
    assert (kept.pk, kept.last_tick) == (row.pk, tick_of(0))

    pipeline = save_pipeline(
        "nightly", definition('{cron: "30 4 * * 1-5", timezone: Europe/Berlin}'), pipeline
    )
    schedules.sync_definitions()
    [replaced] = Schedule.objects.all()
    assert replaced.pk != row.pk
    assert (replaced.cron, replaced.from_definition, replaced.last_tick) == (
        "30 4 * * 1-5", True, None,
    )  # fmt: skip

    save_pipeline("nightly", STAGES, pipeline)
    schedules.sync_definitions()
    assert not Schedule.objects.exists()


def test_a_tick_fires_once_and_only_the_latest_missed_one():
    with time_machine.travel(berlin(-1, 1), tick=False):  # before yesterday's tick
        pipeline = make_pipeline("ticking", definition(NIGHTLY))
        schedules.sync_definitions()
    schedule = Schedule.objects.get()
    # Yesterday's tick and today's are due: only today's fires.
    assert fire_at(berlin(0, 4)) == 1
    build = Build.objects.get()
    assert build.idempotency_key == key(schedule, tick_of(0))
    assert build.pipeline == pipeline
    assert build.source == {}  # no repository: a build of no commit
    schedule.refresh_from_db()
    assert (schedule.last_tick, schedule.last_build, schedule.last_error) == (tick_of(0), build, "")

    assert fire_at(berlin(0, 4, 1)) == 0  # the next sweep
    assert fire_at(berlin(1, 2, 59)) == 0
    with time_machine.travel(berlin(0, 4, 2), tick=False):
        assert schedules.fire(schedule, tick_of(0)) is False  # another beat, the same tick
    assert Build.objects.count() == 1
    schedule.refresh_from_db()
    assert schedule.last_tick == tick_of(0)

    # Beat down for three days: one build, of the latest tick.
    assert fire_at(berlin(3, 4)) == 1
    assert sorted(Build.objects.values_list("idempotency_key", flat=True)) == sorted(
        [key(schedule, tick_of(0)), key(schedule, tick_of(3))]
    )
    schedule.refresh_from_db()
    assert schedule.last_tick == tick_of(3)


def test_a_tick_before_the_schedule_existed_never_fires():
    with time_machine.travel(berlin(0, 3, 30), tick=False):
        make_pipeline("late", definition(NIGHTLY))
        schedules.sync_definitions()
    assert fire_at(berlin(0, 4)) == 0
    assert fire_at(berlin(1, 2, 59)) == 0
    assert not Build.objects.exists()
    assert fire_at(berlin(1, 3)) == 1


def test_the_schedules_variables_reach_its_build():
    entry = '{cron: "0 3 * * *", timezone: Europe/Berlin, variables: {SUITE: full}}'
    with time_machine.travel(berlin(-1, 1), tick=False):
        make_pipeline("suites", definition(entry, head="variables: {SUITE: quick, OS: linux}\n"))
        schedules.sync_definitions()
    assert Schedule.objects.get().variables == {"SUITE": "full"}
    assert fire_at(berlin(0, 4)) == 1
    values = dict(
        BuildVariable.objects.filter(build=Build.objects.get()).values_list("name", "value")
    )
    assert values == {"SUITE": "full", "OS": "linux"}


def test_an_admin_schedule_is_left_to_the_admin():
    with time_machine.travel(berlin(-1, 1), tick=False):
        pipeline = make_pipeline("mixed", definition(NIGHTLY))
        plain = make_pipeline("plain", STAGES)
        own = Schedule.objects.create(pipeline=pipeline, cron="15 2 * * *", timezone="UTC")
        other = Schedule.objects.create(pipeline=plain, cron="0 * * * *")
        schedules.sync_definitions()
    assert Schedule.objects.filter(pipeline=pipeline).count() == 2
    save_pipeline("mixed", STAGES, pipeline)  # its YAML's schedules removed
    schedules.sync_definitions()
    assert set(Schedule.objects.values_list("pk", flat=True)) == {own.pk, other.pk}
    assert not Schedule.objects.filter(from_definition=True).exists()


def test_a_schedule_that_cannot_fire_keeps_no_other_from_firing():
    with time_machine.travel(berlin(-1, 1), tick=False):
        broken = Schedule.objects.create(
            pipeline=make_pipeline("broken", STAGES), cron="0 3 * * *", timezone="UTC"
        )
        make_pipeline("nightly", definition(NIGHTLY))
        schedules.sync_definitions()
    # A zone the admin took that this server's tzdata no longer has: its ticks raise.
    Schedule.objects.filter(pk=broken.pk).update(timezone="Mars/Olympus_Mons")
    assert fire_at(berlin(0, 4)) == 1
    assert Build.objects.get().pipeline.name == "nightly"
    broken.refresh_from_db()
    assert broken.last_error == "timezone: 'Mars/Olympus_Mons' is not an IANA time zone"
    assert broken.last_tick is None


@pytest.fixture
def forge(tmp_path):
    """A repository `app` with one commit on main, served over http with basic auth."""
    served = tmp_path / "served"
    served.mkdir()
    repo = gitservers.Repository(served, "app")
    repo.commit({"README": "one\n"}, "first")
    repo.push("main")
    # Gitea's convention: a token goes as the password of user "oauth2".
    with gitservers.GitHttp(served, "oauth2", CLONE_TOKEN) as http:
        yield repo, http


def scheduled_pipeline(url: str, branch: str = "") -> tuple[Repository, Schedule]:
    """Made the day before DAY: a pipeline of the repository at `url` with an admin's
    nightly schedule of `branch`."""
    with time_machine.travel(berlin(-1, 1), tick=False):
        pipeline = make_pipeline("from-git", STAGES)
        vault.set_secret(pipeline, "CLONE_TOKEN", CLONE_TOKEN)
        repository, _ = repositories.set_repository(
            pipeline, {"forge": "gitea", "clone_url": url, "clone_secret": "CLONE_TOKEN"}
        )
        schedule = Schedule.objects.create(
            pipeline=pipeline, cron="0 3 * * *", timezone="Europe/Berlin", branch=branch
        )
    return repository, schedule


def test_a_tick_builds_the_head_of_the_branch_as_the_forge_has_it(forge):
    repo, http = forge
    url = http.url("app")
    _, schedule = scheduled_pipeline(url)  # the default branch: main
    assert fire_at(berlin(0, 4)) == 1
    build = Build.objects.get()
    assert build.idempotency_key == key(schedule, tick_of(0))
    assert {k: build.source[k] for k in ("event", "sha", "ref", "branch", "repository_url")} == {
        "event": "schedule",
        "sha": repo.sha("main"),
        "ref": "refs/heads/main",
        "branch": "main",
        "repository_url": url,
    }
    # git asked without credentials, was refused, then gave the clone secret's.
    assert http.requests[0].credentials is None
    assert http.requests[0].status == 401
    assert ("oauth2", CLONE_TOKEN) in [r.credentials for r in http.requests if r.status == 200]

    first = build.source["sha"]
    second = repo.commit({"README": "two\n"}, "second")
    repo.push("main")
    assert second != first
    with time_machine.travel(berlin(0, 4, 5), tick=False):  # a late beat, the same tick
        assert schedules.fire(schedule, tick_of(0)) is False  # that tick built its head of then
    assert Build.objects.count() == 1
    schedule.refresh_from_db()
    assert (schedule.last_tick, schedule.last_error) == (tick_of(0), "")  # not an error
    assert fire_at(berlin(1, 4)) == 1
    latest = Build.objects.get(idempotency_key=key(schedule, tick_of(1)))
    assert latest.source["sha"] == second
    schedule.refresh_from_db()
    assert (schedule.last_tick, schedule.last_build, schedule.last_error) == (
        tick_of(1), latest, "",
    )  # fmt: skip


def test_a_branch_the_forge_does_not_have_makes_no_build(forge):
    _repo, http = forge
    _, schedule = scheduled_pipeline(http.url("app"), branch="nope")
    assert fire_at(berlin(0, 4)) == 0
    schedule.refresh_from_db()
    assert schedule.last_error.startswith("no branch 'nope'")
    assert schedule.last_tick is None
    assert not Build.objects.exists()


def test_an_unreachable_forge_is_asked_again_at_the_next_sweep(forge):
    _repo, http = forge
    closed = f"http://127.0.0.1:{gitservers.free_port()}/app.git"  # nothing listens there
    repository, schedule = scheduled_pipeline(closed)
    assert fire_at(berlin(0, 4)) == 0
    schedule.refresh_from_db()
    assert "git ls-remote" in schedule.last_error
    assert CLONE_TOKEN not in schedule.last_error
    assert (schedule.last_tick, schedule.last_build) == (None, None)
    assert not Build.objects.exists()

    Repository.objects.filter(pk=repository.pk).update(clone_url=http.url("app"))  # it is back
    assert fire_at(berlin(0, 4, 1)) == 1
    schedule.refresh_from_db()
    assert (schedule.last_tick, schedule.last_error) == (tick_of(0), "")
    assert Build.objects.get().idempotency_key == key(schedule, tick_of(0))
