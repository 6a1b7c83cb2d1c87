"""The partitioned variable table on the real PostgreSQL: partitions ahead, rows in the
right partition, purge (dry run, exactness, not blocking writers, finishing an interrupted
detach), the retry window read from the catalog, and a write with no partition."""

import threading
import time
from datetime import timedelta

import psycopg
import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from builds import partitions, services
from builds.errors import RetryWindowExpired, VariablePartitionMissing
from builds.models import Build, BuildVariable, PartitionState, VariablePartition
from tests.support import make_pipeline, one_step, raw_connection

DAY = timedelta(days=1)
pytestmark = pytest.mark.usefixtures("no_old_partitions")


def build_at(moment, name="p"):
    """A FAILED build created at `moment`, with a variable, in the partition of that time."""
    partitions.ensure(now=moment, ahead=0)
    pipeline = make_pipeline(f"{name}-{moment:%Y%m%d}", one_step("true", runs_on="unit-tests"))
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
def test_variables_land_in_the_partition_of_their_build():
    pipeline = make_pipeline("p", one_step("true", runs_on="unit-tests"))
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
    assert partitions.purge(dry_run=True) == [expired_name]
    assert [p.name for p in partitions.catalog()] == before
    assert partitions.purge(by="test") == [expired_name]
    after = [p.name for p in partitions.catalog()]
    assert after == [name for name in before if name != expired_name]
    assert not BuildVariable.objects.filter(build=expired_build).exists()
    assert BuildVariable.objects.filter(build=kept_build).exists()
    row = VariablePartition.objects.get(name=expired_name)
    assert (row.state, row.dropped_by) == ("dropped", "test")
    assert partitions.purge() == []  # nothing left to do


@pytest.mark.django_db(transaction=True)
def test_purge_does_not_block_writers_while_it_waits_for_readers():
    """A long reader holds the old partition; DETACH CONCURRENTLY waits for it, and meanwhile
    builds keep writing variables. (A DROP TABLE would queue an ACCESS EXCLUSIVE lock on the
    parent behind the reader, and every writer behind that.)"""
    old = build_at(timezone.now() - 100 * DAY)
    current = services.trigger_build(make_pipeline("w", one_step("true", runs_on="unit-tests")))
    reader = raw_connection()
    reader.autocommit = False
    reader.execute("SELECT count(*) FROM builds_buildvariable WHERE build_id = %s", [old.pk])
    stalls, stop = [], threading.Event()

    def write():
        with raw_connection() as writer:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                writer.execute(
                    "INSERT INTO builds_buildvariable VALUES (%s, %s, %s, 'x', 'step')",
                    [current.created_at, current.pk, f"V{n}"],
                )
                stalls.append(time.monotonic() - started)
                n += 1
                time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()

    def purge_in_thread():
        try:
            partitions.purge(by="test")
        finally:
            connection.close()  # this thread's own connection

    purge = threading.Thread(target=purge_in_thread)
    purge.start()
    time.sleep(1.5)  # the purge is waiting for the reader; writers must not be
    reader.rollback()
    reader.close()
    purge.join(timeout=30)
    stop.set()
    writer.join(timeout=10)
    assert not purge.is_alive()
    assert len(stalls) > 50
    assert max(stalls) < 0.5, f"a writer waited {max(stalls):.2f} s"
    assert not BuildVariable.objects.filter(build=old).exists()


@pytest.mark.django_db(transaction=True)
def test_an_interrupted_detach_and_a_detached_leftover_are_finished():
    now = timezone.now()
    pending = partition_of(build_at(now - 120 * DAY, "a"))
    leftover = partition_of(build_at(now - 110 * DAY, "b"))
    with raw_connection() as admin:
        admin.execute(f'ALTER TABLE builds_buildvariable DETACH PARTITION "{leftover}"')
        # A reader keeps the second phase of a concurrent detach waiting; a timeout then
        # interrupts it, leaving the partition "detach pending", as a killed purge would.
        reader = raw_connection()
        reader.autocommit = False
        reader.execute("SELECT count(*) FROM builds_buildvariable")
        admin.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            admin.execute(
                f'ALTER TABLE builds_buildvariable DETACH PARTITION "{pending}" CONCURRENTLY'
            )
        reader.rollback()
        reader.close()
    assert [p.detach_pending for p in partitions.catalog() if p.name == pending] == [True]
    assert leftover in partitions.detached_leftovers()
    assert sorted(partitions.purge(by="test")) == sorted([pending, leftover])
    assert pending not in [p.name for p in partitions.catalog()]
    assert partitions.detached_leftovers() == []


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
    with time_machine.travel(newer.created_at + 90 * DAY - timedelta(hours=1), tick=False):
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
    pipeline = make_pipeline("far", one_step("true", runs_on="unit-tests"))
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
