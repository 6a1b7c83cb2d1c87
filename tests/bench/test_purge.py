"""Purge figures (`make bench`): dropping an expired variable partition (builds.partitions.purge:
DETACH ... CONCURRENTLY, then DROP of the detached table) against deleting the same rows with
DELETE and reclaiming them with VACUUM, for partitions of 1M and 5M rows. The DELETE and the
VACUUM work row by row and grow with the partition; the purge only changes the catalog and
removes files (its breakdown is printed: what is left to grow is the file system's cost of
freeing the files). Also the stalls of a builder writing variables into the current
partition meanwhile."""

import itertools
import statistics
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from builds import partitions, services
from tests.support import make_pipeline, one_step, raw_connection

SIZES = (1_000_000, 5_000_000)
DAY = timedelta(days=1)
WRITE_EVERY = 0.005  # seconds between two writes of the concurrent writer
MARGIN = 0.3  # seconds the writer runs before and after what it watches


def old_build(moment, name: str):
    """A build created at `moment` (no variables of its own), with the partition of that time."""
    partitions.ensure(now=moment, ahead=0)
    pipeline = make_pipeline(name, one_step("true", runs_on="bench-nowhere"))
    with time_machine.travel(moment, tick=False):
        return services.trigger_build(pipeline)


def fill(build, rows: int) -> str:
    """Create (again) the partition of `build` and put `rows` variables of it there, in one
    INSERT ... SELECT. Returns the partition's name."""
    partitions.ensure(now=build.created_at, ahead=0)
    name = partitions.name_for(partitions.bounds_for(build.created_at)[0])
    with raw_connection() as admin:
        # No autovacuum on the bench partitions: it would run into the timed DELETE + VACUUM.
        admin.execute(f'ALTER TABLE "{name}" SET (autovacuum_enabled = off)')
        with admin.transaction():
            admin.execute("SET LOCAL synchronous_commit = off")
            admin.execute(
                f'INSERT INTO "{name}" (build_created_at, build_id, name, value, source)'
                " SELECT %s, %s, 'V' || g, 'x', 'trigger' FROM generate_series(1, %s) g",
                [build.created_at, build.pk, rows],
            )
        # A partition this old has long been vacuumed (hint bits set, visibility map full),
        # and its pages written out: start both methods from that state.
        admin.execute(f'VACUUM (ANALYZE) "{name}"')
        admin.execute("CHECKPOINT")
    return name


class Writer:
    """A builder on its own connection writing every WRITE_EVERY s, recording when each
    write started and ended: by default a variable inserted into the current partition;
    with `build_status`, an UPDATE of the build's row (as each job's start and end does)."""

    names = itertools.count()

    def __init__(self, build, build_status: bool = False):
        self.build, self.build_status = build, build_status
        self.writes: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def write(self, conn) -> None:
        if self.build_status:
            conn.execute("UPDATE builds_build SET status = status WHERE id = %s", [self.build.pk])
        else:
            conn.execute(
                "INSERT INTO builds_buildvariable VALUES (%s, %s, %s, 'x', 'step')",
                [self.build.created_at, self.build.pk, f"W{next(self.names)}"],
            )

    def run(self):
        with raw_connection() as conn:
            while not self.stop.is_set():
                started = time.perf_counter()
                self.write(conn)
                self.writes.append((started, time.perf_counter()))
                time.sleep(WRITE_EVERY)

    def during(self, start: float, end: float) -> str:
        """The writes that overlapped [start, end]: their count, p99 and max latency."""
        ms = sorted((e - s) * 1000 for s, e in self.writes if s <= end and e >= start)
        if not ms:
            return "no writes"
        p99 = ms[max(0, int(len(ms) * 0.99) - 1)]
        return (
            f"{len(ms)} writes, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms,"
            f" max {ms[-1]:.1f} ms"
        )


@contextmanager
def statement_times():
    """Seconds spent in each DETACH and DROP statement run on Django's connection, summed by
    kind: the purge's breakdown."""
    spent = {"DETACH": 0.0, "DROP": 0.0, "ALTER": 0.0}

    def timed(execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            kind = "DETACH" if "DETACH PARTITION" in sql else sql.split(" ", 1)[0].upper()
            if kind in spent:
                spent[kind] += time.perf_counter() - started

    with connection.execute_wrapper(timed):
        yield spent


@contextmanager
def writing(build):
    """A variable writer and a build-status writer, both running."""
    writers = (Writer(build), Writer(build, build_status=True))
    for writer in writers:
        writer.thread.start()
    try:
        time.sleep(MARGIN)
        yield writers
        time.sleep(MARGIN)
    finally:
        for writer in writers:
            writer.stop.set()
            writer.thread.join(timeout=30)
    assert not any(writer.thread.is_alive() for writer in writers)


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("no_old_partitions")
@pytest.mark.django_db(transaction=True)
def test_purge_against_delete_and_vacuum():
    now = timezone.now()
    day = partitions.bounds_for(now)[0] + timedelta(hours=12)
    purged = old_build(day - 130 * DAY, "bench-purge-dropped")
    deleted = old_build(day - 120 * DAY, "bench-purge-deleted")
    writing_build = services.trigger_build(
        make_pipeline("bench-purge-writer", one_step("true", runs_on="bench-nowhere"))
    )
    start2, end2 = partitions.bounds_for(deleted.created_at)
    end1 = partitions.bounds_for(purged.created_at)[1]
    results = []
    for rows in SIZES:
        filling = time.perf_counter()
        dropped_name = fill(purged, rows)
        deleted_name = fill(deleted, rows)
        filled = time.perf_counter() - filling
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size(%s::regclass)", [dropped_name])
            megabytes = cursor.fetchone()[0] / 2**20

        # (a) the purge: only the first partition ends before `end1`.
        with writing(writing_build) as (writer, updater), statement_times() as spent:
            started = time.perf_counter()
            assert partitions.purge(before=end1, by="bench").dropped == [dropped_name]
            ended = time.perf_counter()
        purge = ended - started
        purge_writes = writer.during(started, ended)
        purge_updates = updater.during(started, ended)

        # (b) the same rows deleted, then the table vacuumed (outside a transaction).
        with writing(writing_build) as (writer, updater), raw_connection() as admin:
            started = time.perf_counter()
            removed = admin.execute(
                "DELETE FROM builds_buildvariable"
                " WHERE build_created_at >= %s AND build_created_at < %s",
                [start2, end2],
            ).rowcount
            vacuuming = time.perf_counter()
            admin.execute(f'VACUUM "{deleted_name}"')
            ended = time.perf_counter()
        assert removed == rows
        delete, vacuum = vacuuming - started, ended - vacuuming
        delete_writes = writer.during(started, ended)
        delete_updates = updater.during(started, ended)

        ratio = (delete + vacuum) / purge
        results.append((rows, purge, delete, vacuum, ratio))
        print(
            f"\npurge of a {rows:,}-row partition ({megabytes:.0f} MB): {purge:.3f} s"
            f" | DELETE {delete:.2f} s + VACUUM {vacuum:.2f} s"
            f" = {delete + vacuum:.2f} s, {ratio:.1f}x the purge"
            f"  (filling both partitions took {filled:.0f} s)"
            f"\n  in the purge: DETACH CONCURRENTLY {spent['DETACH']:.3f} s,"
            f" DROP TABLE {spent['DROP']:.3f} s, DROP CONSTRAINT {spent['ALTER']:.3f} s,"
            f" catalog reads and bookkeeping {purge - sum(spent.values()):.3f} s"
            f"\n  concurrent variable writer during the purge: {purge_writes}"
            f"\n  concurrent builds_build updater during the purge: {purge_updates}"
            f"\n  concurrent variable writer during DELETE + VACUUM: {delete_writes}"
            f"\n  concurrent builds_build updater during DELETE + VACUUM: {delete_updates}"
            f"\n  (target: no write waits more than 20 ms)"
        )
        # Drop the emptied partition too, so the next size starts from two fresh ones.
        assert partitions.purge(before=end2, by="bench").dropped == [deleted_name]

    print("\n       rows   purge s   DELETE s   VACUUM s   (DELETE+VACUUM)/purge")
    for rows, purge, delete, vacuum, ratio in results:
        print(f"{rows:>11,}   {purge:7.3f}   {delete:8.2f}   {vacuum:8.2f}   {ratio:10.1f}x")
