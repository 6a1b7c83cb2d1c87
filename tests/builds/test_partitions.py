"""The partitioned variable table on the real PostgreSQL: partitions ahead, rows in the
right partition, purge (dry run, exactness, not blocking writers, giving up a lock wait that
would stall builds, finishing an interrupted detach, one at a time, the management command),
the retry window read from the catalog, and a write with no partition."""

import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from io import StringIO

import psycopg
import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from agents import services as agents
from agents.process.agent import AgentProcess
from audit.models import AuditEvent
from builds import partitions, services
from builds.errors import PurgeBeforeTooLate, RetryWindowExpired, VariablePartitionMissing
from builds.management.commands.partitions import parse_date
from builds.models import (
    Build,
    BuildVariable,
    JobRun,
    PartitionState,
    StepRun,
    VariablePartition,
)
from tests.support import make_pipeline, one_step, raw_connection, wait_until

DAY = timedelta(days=1)
pytestmark = pytest.mark.usefixtures("no_old_partitions")


def build_at(moment, name="p"):
    """A FAILED build created at `moment`, with a variable, in the partition of that time."""
    partitions.ensure(now=moment, ahead=0)
    pipeline = make_pipeline(
        f"{name}-{moment:%Y%m%d}", one_step("true", runs_on="unit-tests", variables="WHO")
    )
    with time_machine.travel(moment, tick=False):
        build = services.trigger_build(pipeline, {"WHO": "old"})
    Build.objects.filter(pk=build.pk).update(status="FAILED")
    build.refresh_from_db()
    return build


def partition_of(build) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT tableoid::regclass::text FROM builds_buildvariable"
            " WHERE build_id = %s",
            [build.pk],
        )
        (name,) = cursor.fetchone()
        return name


def catalog_names() -> list[str]:
    return [p.name for p in partitions.catalog()]


@contextmanager
def holding(sql: str, params=()):
    """A transaction on a connection of its own that ran `sql` and stays open, holding its
    locks, until the block ends (or the test rolls it back)."""
    holder = raw_connection()
    holder.autocommit = False
    try:
        holder.execute(sql, params)
        yield holder
    finally:
        holder.rollback()
        holder.close()


@contextmanager
def writing(sql: str, params):
    """A thread on a connection of its own running `sql` with `params(n)` every 10 ms, as
    builds do, while the block runs. Yields the list of how long each run took (seconds)."""
    stalls, stop = [], threading.Event()

    def write():
        with raw_connection() as writer:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                writer.execute(sql, params(n))
                stalls.append(time.monotonic() - started)
                n += 1
                time.sleep(0.01)  # pacing, not waiting for anything

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield stalls
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


class Background(threading.Thread):
    """`fn()` started in a thread with its own Django connection; keeps its result or error."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except Exception as exc:  # the test looks at it
            self.error = exc
        finally:
            connection.close()  # this thread's own connection


def waiting_for_a_lock(conn, statement: str) -> bool:
    """Whether a session of the test database runs `statement...` and waits for a lock."""
    (count,) = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE %s",
        [f"{statement}%"],
    ).fetchone()
    return count > 0


def interrupt_detach(name: str) -> None:
    """Leave `name` "detach pending", as a purge killed mid-detach would: a reader keeps the
    concurrent detach waiting, and a statement timeout interrupts it."""
    with raw_connection() as admin, holding("SELECT count(*) FROM builds_buildvariable"):
        admin.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            admin.execute(
                f'ALTER TABLE builds_buildvariable DETACH PARTITION "{name}" CONCURRENTLY'
            )
    assert [p.detach_pending for p in partitions.catalog() if p.name == name] == [True]


def purge_command(*args) -> str:
    out = StringIO()
    call_command("partitions", "purge", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_partitions_are_created_ahead_and_mirrored():
    now = timezone.now()
    names = [p.name for p in partitions.catalog()]
    current, _ = partitions.bounds_for(now)
    expected = [partitions.name_for(current + n * DAY) for n in range(8)]
    assert names[-8:] == expected  # the current partition and 7 ahead, from migrate
    assert partitions.ensure() == []  # idempotent
    assert partitions.ensure(ahead=9) == [partitions.name_for(current + n * DAY) for n in (8, 9)]
    mirrored = VariablePartition.objects.filter(state=PartitionState.LIVE)
    assert set(mirrored.values_list("name", flat=True)) >= set(expected)


@pytest.mark.django_db(transaction=True)
def test_a_long_reader_makes_ensure_put_off_partitions_ahead_not_wait(settings):
    """CREATE TABLE ... PARTITION OF waits for ACCESS EXCLUSIVE on the variable table, and
    variable reads and writes would queue behind it: behind a long reader, a partition ahead
    is put off after the lock timeout, and the next run creates it."""
    settings.VARIABLE_PURGE_LOCK_TIMEOUT_MS = 300
    far = timezone.now() + 30 * DAY
    names = [partitions.name_for(partitions.bounds_for(far + n * DAY)[0]) for n in (0, 1)]
    assert partitions.ensure(now=far, ahead=0) == names[:1]
    with holding("SELECT count(*) FROM builds_buildvariable") as holder:
        started = time.monotonic()
        assert partitions.ensure(now=far, ahead=1) == []
        waited = time.monotonic() - started
        holder.rollback()
    assert waited < 5, f"ensure waited {waited:.1f} s behind the reader"
    assert names[1] not in catalog_names()
    assert partitions.ensure(now=far, ahead=1) == names[1:]
    with raw_connection() as admin:  # not left for later tests
        for name in names:
            admin.execute(f'DROP TABLE "{name}"')


@pytest.mark.django_db(transaction=True)
def test_variables_land_in_the_partition_of_their_build():
    pipeline = make_pipeline("p", one_step("true", runs_on="unit-tests", variables="A"))
    build = services.trigger_build(pipeline, {"A": "1"})
    start, _ = partitions.bounds_for(build.created_at)
    assert partition_of(build) == partitions.name_for(start)
    old = build_at(timezone.now() - 40 * DAY)
    assert partition_of(old) == partitions.name_for(partitions.bounds_for(old.created_at)[0])


@pytest.mark.django_db(transaction=True)
def test_purge_drops_exactly_the_expired_partitions_and_dry_run_changes_nothing():
    now = timezone.now()
    expired_build = build_at(now - 95 * DAY)
    kept_build = build_at(now - 80 * DAY)
    expired_name = partition_of(expired_build)
    before = [p.name for p in partitions.catalog()]
    assert partitions.purge(dry_run=True).dropped == [expired_name]
    assert [p.name for p in partitions.catalog()] == before
    assert partitions.purge(by="test").dropped == [expired_name]
    after = [p.name for p in partitions.catalog()]
    assert after == [name for name in before if name != expired_name]
    assert not BuildVariable.objects.filter(build=expired_build).exists()
    assert BuildVariable.objects.filter(build=kept_build).exists()
    row = VariablePartition.objects.get(name=expired_name)
    assert (row.state, row.dropped_by) == ("dropped", "test")
    assert partitions.purge().dropped == []  # nothing left to do
    assert not AuditEvent.objects.exists()  # the system's own upkeep


@pytest.mark.django_db(transaction=True)
def test_purge_does_not_block_writers_while_it_waits_for_readers(settings):
    """A long reader holds the old partition; DETACH CONCURRENTLY waits for it, and meanwhile
    builds keep writing variables. (A DROP TABLE would queue an ACCESS EXCLUSIVE lock on the
    parent behind the reader, and every writer behind that.)"""
    settings.VARIABLE_PURGE_LOCK_TIMEOUT_MS = 10_000  # the wait must outlast the reader here
    old = build_at(timezone.now() - 100 * DAY)
    name = partition_of(old)
    current = services.trigger_build(make_pipeline("w", one_step("true", runs_on="unit-tests")))
    insert = "INSERT INTO builds_buildvariable VALUES (%s, %s, %s, 'x', 'step')"
    with (
        raw_connection() as watcher,
        writing(insert, lambda n: [current.created_at, current.pk, f"V{n}"]) as stalls,
    ):
        with holding("SELECT count(*) FROM builds_buildvariable WHERE build_id = %s", [old.pk]):
            purge = Background(lambda: partitions.purge(by="test"))
            wait_until(
                lambda: waiting_for_a_lock(watcher, "ALTER TABLE"),
                timeout=10,
                message="the purge to wait for the reader",
            )
            seen = len(stalls)
            wait_until(lambda: len(stalls) > seen + 20, timeout=10, message="20 more writes")
        purge.join(timeout=30)
    assert not purge.is_alive()
    assert purge.error is None
    assert purge.result.dropped == [name]
    assert max(stalls) < 0.5, f"a writer waited {max(stalls):.2f} s"
    assert not BuildVariable.objects.filter(build=old).exists()


@pytest.mark.parametrize(
    ("holder_sql", "left_as"),
    [
        # An open transaction that wrote a build: finishing the detach waits for it (SHARE ROW
        # EXCLUSIVE on builds_build, for the detached table's FK triggers): left pending.
        ("UPDATE builds_build SET status = status WHERE id = %s", "pending"),
        # Even one that only read builds: the DROP waits for it (ACCESS EXCLUSIVE on
        # builds_build, to remove those triggers): the detached table is left behind.
        ("SELECT count(*) FROM builds_build WHERE id >= %s", "leftover"),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_a_long_transaction_on_builds_makes_the_purge_give_up_not_stall_builds(
    settings, holder_sql, left_as
):
    settings.VARIABLE_PURGE_LOCK_TIMEOUT_MS = 300
    old = build_at(timezone.now() - 100 * DAY)
    name = partition_of(old)
    current = services.trigger_build(make_pipeline("w", one_step("true", runs_on="unit-tests")))
    update = "UPDATE builds_build SET status = status WHERE id = %s"
    with writing(update, lambda n: [current.pk]) as stalls:
        wait_until(lambda: len(stalls) >= 5, timeout=10, message="the writer to write")
        with holding(holder_sql, [old.pk]) as holder:
            purge = Background(lambda: partitions.purge(by="beat"))
            purge.join(timeout=10)  # the deadline; the lock timeout is 0.3 s
            gave_up = not purge.is_alive()
            holder.rollback()  # so that a purge that did not give up can end
        purge.join(timeout=30)
        seen = len(stalls)
        wait_until(lambda: len(stalls) > seen + 5, timeout=10, message="the writer to go on")
    assert gave_up, "the purge waited for the long transaction, and builds queued behind it"
    assert purge.error is None
    assert (purge.result.dropped, purge.result.postponed) == ([], [name])
    assert f"a lock wait for {name} took over 300 ms" in purge.result.reason
    assert max(stalls) < 1.0, f"a build write waited {max(stalls):.2f} s behind the purge"
    pending = [p.detach_pending for p in partitions.catalog() if p.name == name]
    leftover = name in partitions.detached_leftovers()
    assert (pending, leftover) == (([True], False) if left_as == "pending" else ([], True))
    assert VariablePartition.objects.get(name=name).state == PartitionState.DETACHING
    # The next run, the long transaction gone, finishes the job.
    assert partitions.purge(by="beat").dropped == [name]
    assert name not in catalog_names()
    assert partitions.detached_leftovers() == []
    assert not BuildVariable.objects.filter(build=old).exists()


@pytest.mark.django_db(transaction=True)
def test_an_interrupted_detach_and_a_detached_leftover_are_finished():
    now = timezone.now()
    pending = partition_of(build_at(now - 120 * DAY, "a"))
    leftover = partition_of(build_at(now - 110 * DAY, "b"))
    with raw_connection() as admin:
        admin.execute(f'ALTER TABLE builds_buildvariable DETACH PARTITION "{leftover}"')
    interrupt_detach(pending)
    assert leftover in partitions.detached_leftovers()
    assert partitions.purge(by="test").dropped == [leftover, pending]
    assert pending not in catalog_names()
    assert partitions.detached_leftovers() == []


@pytest.mark.django_db(transaction=True)
def test_a_pending_detach_is_finished_whatever_the_cutoff():
    """PostgreSQL allows one pending detach per table: one the purge's cutoff does not reach
    (left by a run under a shorter retention, or by hand) would make every new detach fail."""
    now = timezone.now()
    oldest = build_at(now - 120 * DAY, "oldest")
    expired = partition_of(build_at(now - 100 * DAY, "expired"))
    pending = partition_of(build_at(now - 80 * DAY, "pending"))  # within the retention
    interrupt_detach(pending)
    before = partitions.bounds_for(oldest.created_at)[1]  # reaches the oldest only
    oldest = partition_of(oldest)
    assert partitions.purge(before=before, dry_run=True).dropped == [pending, oldest]
    assert partitions.purge(before=before, by="test").dropped == [pending, oldest]
    assert partitions.purge(by="test").dropped == [expired]
    assert not {pending, oldest, expired} & set(catalog_names())


@pytest.mark.django_db(transaction=True)
def test_one_purge_at_a_time(settings):
    settings.VARIABLE_PURGE_LOCK_TIMEOUT_MS = 20_000
    name = partition_of(build_at(timezone.now() - 100 * DAY))
    with raw_connection() as watcher:
        # A reader of builds_build keeps the first at the drop of the detached table's FK.
        with holding("SELECT count(*) FROM builds_build"):
            first = Background(lambda: partitions.purge(by="beat"))
            wait_until(
                lambda: waiting_for_a_lock(watcher, f'ALTER TABLE "{name}" DROP CONSTRAINT'),
                timeout=10,
                message="the first purge to wait at its foreign key's drop",
            )
            started = time.monotonic()
            output = purge_command()
            second = partitions.purge(by="test")
            elapsed = time.monotonic() - started
            assert name in partitions.detached_leftovers()  # left to the first
        first.join(timeout=30)
        (advisory,) = watcher.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert elapsed < 2, f"the second purge took {elapsed:.1f} s to give way"
    assert output == "dropped 0 partition(s)\nstopped: another purge is running\n"
    assert (second.dropped, second.postponed, second.reason) == ([], [], partitions.ANOTHER_PURGE)
    assert first.error is None
    assert first.result.dropped == [name]
    assert advisory == 0  # released when the first ended
    assert partitions.purge(by="test").reason == ""


@pytest.mark.django_db(transaction=True)
def test_the_purge_command_parses_dates_dry_runs_and_refuses_a_late_before():
    now = timezone.now()
    older = build_at(now - 120 * DAY, "older")
    old = partition_of(build_at(now - 100 * DAY, "old"))
    end = partitions.bounds_for(older.created_at)[1]  # midnight UTC, where a partition ends
    older = partition_of(older)

    def state():
        return catalog_names(), sorted(VariablePartition.objects.values_list("name", "state"))

    unchanged = state()
    assert purge_command("--dry-run") == f"would drop 2 partition(s)\n  {older}\n  {old}\n"
    assert purge_command("--dry-run", "--before", f"{end:%Y-%m-%d}") == (
        f"would drop 1 partition(s)\n  {older}\n"
    )
    assert state() == unchanged
    # A bare date is midnight UTC, an offset is honoured, anything else is a usage error.
    assert parse_date("2026-08-01") == datetime(2026, 8, 1, tzinfo=UTC)
    assert parse_date("2026-08-01T02:00+02:00") == datetime(2026, 8, 1, tzinfo=UTC)
    with pytest.raises(CommandError, match="'yesterday' is not a date such as 2026-08-01"):
        purge_command("--before", "yesterday")
    # Later than the retention cutoff (a day inside the retention, today, a future day):
    # refused with its code, dry run or not, and nothing changes.
    cutoff = now - partitions.retention()
    for late in (cutoff + DAY, now, now + DAY):
        for dry_run in ([], ["--dry-run"]):
            with pytest.raises(CommandError) as refused:
                purge_command(*dry_run, "--before", f"{late:%Y-%m-%d}")
            assert str(refused.value).startswith("PURGE_BEFORE_TOO_LATE: Cannot purge")
            assert f"give a date on or before {cutoff:%Y-%m-%d}" in str(refused.value)
    assert state() == unchanged
    assert not AuditEvent.objects.exists()  # refusals and dry runs change nothing
    assert purge_command("--before", f"{end:%Y-%m-%d}") == f"dropped 1 partition(s)\n  {older}\n"
    assert purge_command() == f"dropped 1 partition(s)\n  {old}\n"
    # Each drop is the operator's, in the trail; beat's own (test_purge_drops_...) is not.
    events = AuditEvent.objects.order_by("pk").values_list("action", "target_label", "via")
    assert list(events) == [("partition.drop", older, "cli"), ("partition.drop", old, "cli")]
    assert {e.username.startswith("os:") for e in AuditEvent.objects.all()} == {True}


@pytest.mark.django_db(transaction=True)
def test_partitions_made_ahead_by_the_command_are_the_operators():
    # Two beyond those there are (migrate made 7 ahead; an earlier test may have made more).
    start, _ = partitions.bounds_for(timezone.now())
    starts, there = {p.start for p in partitions.catalog()}, 0
    while start + there * partitions.partition_size() in starts:  # the run ensure() finds made
        there += 1
    ahead = str(there + 1)
    out = StringIO()
    call_command("partitions", "ensure", "--ahead", ahead, stdout=out)
    made = out.getvalue().split()[3:]
    assert len(made) == 2, out.getvalue()
    events = AuditEvent.objects.order_by("pk").values_list("action", "target_label", "via")
    assert list(events) == [("partition.create", name, "cli") for name in made]
    call_command("partitions", "ensure", "--ahead", ahead, stdout=StringIO())  # nothing to make
    assert AuditEvent.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_the_purge_command_line_reports_a_bad_date_and_a_refusal_without_a_traceback(worker_env):
    def run(*args):
        argv = [sys.executable, "manage.py", "partitions", "purge", *args]
        return subprocess.run(argv, env=worker_env, capture_output=True, text=True, timeout=60)

    bad = run("--before", "yesterday")
    assert bad.returncode == 2  # a usage error
    assert "argument --before: 'yesterday' is not a date such as 2026-08-01" in bad.stderr
    late = run("--before", f"{timezone.now():%Y-%m-%d}")
    assert late.returncode == 1
    assert "CommandError: PURGE_BEFORE_TOO_LATE: Cannot purge" in late.stderr
    assert "Traceback" not in bad.stderr + late.stderr


@pytest.mark.django_db(transaction=True)
def test_purge_refuses_a_before_later_than_the_retention_cutoff():
    now = timezone.now()
    cutoff = now - partitions.retention()
    with pytest.raises(PurgeBeforeTooLate) as refused:
        partitions.purge(before=cutoff + timedelta(seconds=1), now=now)
    assert (refused.value.code, refused.value.fields) == (
        "PURGE_BEFORE_TOO_LATE",
        {
            "before": (cutoff + timedelta(seconds=1)).isoformat(),
            "cutoff": cutoff.isoformat(),
            "retention_days": 90,
        },
    )
    assert partitions.purge(before=cutoff, now=now).dropped == []  # the cutoff itself is allowed


@pytest.mark.django_db(transaction=True)
def test_the_retry_window_follows_the_catalog():
    now = timezone.now()
    oldest = build_at(now - 60 * DAY, "oldest")
    newer = build_at(now - 50 * DAY, "newer")
    assert services.can_retry(oldest).allowed
    name = partition_of(oldest)
    with raw_connection() as admin:  # an operator drops the oldest partition by hand
        admin.execute(f'DROP TABLE "{name}"')
    decision = services.can_retry(oldest)
    assert (decision.allowed, decision.code) == (False, "RETRY_WINDOW_EXPIRED")
    earliest = partitions.bounds_for(newer.created_at)[0]
    assert decision.fields["earliest_retryable"] == earliest.isoformat()
    assert decision.reason == (
        f"Build #{oldest.number} of {oldest.pipeline.name!r} was created on"
        f" {oldest.created_at:%Y-%m-%d}; only builds created on or after {earliest:%Y-%m-%d}"
        f" can be retried, because build variables are kept for 90 days."
    )
    assert services.can_retry(newer).allowed
    # Near the end of the retention, within the safety margin, the window closes.
    closes = partitions.bounds_for(newer.created_at)[1] + 90 * DAY  # its partition is purged
    with time_machine.travel(closes - timedelta(hours=1), tick=False):
        assert services.can_retry(newer).code == "RETRY_WINDOW_EXPIRED"


@pytest.mark.django_db(transaction=True)
def test_a_refused_retry_changes_nothing():
    build = build_at(timezone.now() - 60 * DAY)
    with raw_connection() as admin:
        admin.execute(f'DROP TABLE "{partition_of(build)}"')
    with pytest.raises(RetryWindowExpired) as refused:
        services.retry_build(build.pk)
    assert refused.value.fields["retention_days"] == 90
    fresh = Build.objects.get(pk=build.pk)
    assert (fresh.status, fresh.attempt) == ("FAILED", 1)


@pytest.mark.django_db(transaction=True)
def test_a_write_with_no_partition_is_refused_and_stores_nothing():
    pipeline = make_pipeline("far", one_step("true", runs_on="unit-tests", variables="A"))
    later = timezone.now() + 30 * DAY
    with time_machine.travel(later, tick=False), pytest.raises(VariablePartitionMissing) as missing:
        services.trigger_build(pipeline, {"A": "1"})
    assert missing.value.code == "VARIABLE_PARTITION_MISSING"
    assert Build.objects.filter(pipeline=pipeline).count() == 0
    pipeline.refresh_from_db()
    assert pipeline.last_build_number == 0


def test_admin_lists_the_partitions_from_the_catalog(admin_client):
    build = build_at(timezone.now() - 95 * DAY)
    name = partition_of(build)
    page = admin_client.get("/admin/builds/variablepartition/").content.decode()
    assert name in page
    partitions.purge(by="test")
    page = admin_client.get("/admin/builds/variablepartition/?state__exact=dropped")
    assert name in page.content.decode()


def failed_step_of(build) -> StepRun:
    """Its one step, FAILED as its job: a step retry's candidate."""
    job = JobRun.objects.get(build=build)
    JobRun.objects.filter(pk=job.pk).update(status="FAILED")
    StepRun.objects.filter(job=job).update(status="FAILED", started_at=build.created_at)
    return job.steps.get()


@pytest.mark.django_db(transaction=True)
def test_a_step_retry_of_a_finished_build_is_held_to_the_retry_window():
    build = build_at(timezone.now() - 60 * DAY)
    step = failed_step_of(build)
    with raw_connection() as admin:
        admin.execute(f'DROP TABLE "{partition_of(build)}"')
    expected = services.can_retry(build, include_succeeded=True)
    with pytest.raises(RetryWindowExpired) as refused:
        services.retry_step(build.pk, step.pk)
    # The build retry's own answer: its reason and its fields.
    assert (refused.value.detail, refused.value.fields) == (expected.reason, expected.fields)
    fresh = StepRun.objects.get(pk=step.pk)
    assert (fresh.status, fresh.attempt, Build.objects.get(pk=build.pk).status) == (
        "FAILED",
        1,
        "FAILED",
    )


@pytest.mark.django_db(transaction=True)
def test_a_step_retry_within_the_window_runs_as_before():
    build = build_at(timezone.now() - 60 * DAY)
    step = services.retry_step(build.pk, failed_step_of(build).pk)
    assert (step.status, step.attempt) == ("PENDING", 2)
    assert Build.objects.get(pk=build.pk).status == "RUNNING"


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_variables_were_purged_fails_saying_so_and_runs_nothing(settings, tmp_path):
    settings.AGENT_WORKSPACE_ROOT = str(tmp_path)
    agents.register_agent("a1", "host", ["unit-tests"], 1, "1")
    moment = timezone.now() - 60 * DAY
    partitions.ensure(now=moment, ahead=0)
    marker = tmp_path / "ran"
    pipeline = make_pipeline(
        "purged", one_step(f"touch {marker}", runs_on="unit-tests", variables="WHO")
    )
    with time_machine.travel(moment, tick=False):
        build = services.trigger_build(pipeline, {"WHO": "old"})  # RUNNING, its job QUEUED
    with raw_connection() as admin:
        admin.execute(f'DROP TABLE "{partition_of(build)}"')
    job = JobRun.objects.get(build=build)
    assert AgentProcess("a1", ["unit-tests"]).run_job(job.pk, 1) == "FAILED"
    job.refresh_from_db()
    assert job.reason == (
        f"the variables of build #{build.number} are gone: the partition holding builds"
        f" created on {build.created_at:%Y-%m-%d} was purged (VARIABLE_RETENTION_DAYS)"
    )
    assert not marker.exists()
    assert job.steps.get().status == "SKIPPED"
