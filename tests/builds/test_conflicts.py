"""A transaction PostgreSQL aborts for a conflict (here a real deadlock between a trigger
and another transaction) is run again by the service: the client gets its build, never a
500; and an abort nothing retried answers 503 DATABASE_BUSY with Retry-After."""

import threading

import pytest
from django.db import connection

from builds import services
from builds.models import Build, JobRun
from concurrency.models import ConcurrencyPolicy
from tests.support import PARALLEL, client_for, make_pipeline, raw_connection, wait_until

pytestmark = pytest.mark.django_db(transaction=True)  # the deadlock needs three sessions


def waiting_for_a_lock(watcher, pid: int) -> bool:
    row = watcher.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()
    return bool(row) and row[0] == "Lock"


def test_a_trigger_aborted_by_a_deadlock_is_run_again():
    policy = ConcurrencyPolicy.objects.create(name="p", max_running=5, queue_length=5)
    pipeline = make_pipeline("deadlocked", PARALLEL)
    pipeline.policy = policy
    pipeline.save()
    api = client_for("builds.add_build")
    assert api.post(f"/api/pipelines/{pipeline.pk}/builds/", {}, format="json").status_code == 201
    answers, trigger_pid = [], []

    def trigger():
        with connection.cursor() as cursor:  # this session detects the deadlock: its victim
            cursor.execute("SET deadlock_timeout = '100ms'")
            trigger_pid.append(connection.connection.info.backend_pid)
        answers.append(api.post(f"/api/pipelines/{pipeline.pk}/builds/", {}, format="json"))
        connection.close()

    update_pipeline = "UPDATE builds_pipeline SET updated_at = updated_at WHERE id = %s"
    with raw_connection() as group, raw_connection() as holder, raw_connection() as watcher:
        group.execute("SET deadlock_timeout = '10s'")
        group.execute("BEGIN")
        group.execute(
            "SELECT 1 FROM concurrency_concurrencygroup WHERE key = %s FOR UPDATE",
            [str(pipeline.pk)],
        )
        # The trigger and then `group` queue for the pipeline's row, which `holder` has:
        # when it lets go, the trigger numbers its build and waits for the group's lock,
        # the last of the two to wait, so it is the one that finds the deadlock.
        holder.execute("BEGIN")
        holder.execute(update_pipeline, [pipeline.pk])
        triggering = threading.Thread(target=trigger)
        triggering.start()
        wait_until(lambda: trigger_pid and waiting_for_a_lock(watcher, trigger_pid[0]), timeout=10)
        group_pid = group.info.backend_pid
        went_through = []

        def update_the_pipeline():
            group.execute(update_pipeline, [pipeline.pk])
            went_through.append(True)

        blocked = threading.Thread(target=update_the_pipeline)
        blocked.start()
        wait_until(lambda: waiting_for_a_lock(watcher, group_pid), timeout=10)
        holder.rollback()
        blocked.join(timeout=10)  # the trigger was its victim; this one goes through
        group.rollback()
        triggering.join(timeout=20)
    assert went_through, "the other transaction was the deadlock's victim, not the trigger"
    (answer,) = answers
    assert answer.status_code == 201, answer.content
    assert Build.objects.filter(pipeline=pipeline).count() == 2


def test_a_policy_given_while_a_trigger_waits_for_its_number_governs_that_build():
    """The trigger reads its pipeline's policy in the statement that numbers the build, as
    of that statement's start: a policy made and given to the pipeline while it waited for
    the pipeline's row is read once it has the row, never taken for none."""
    pipeline = make_pipeline("given-a-policy", PARALLEL)
    triggered, trigger_pid = [], []

    def trigger():
        connection.ensure_connection()  # (this thread's own)
        trigger_pid.append(connection.connection.info.backend_pid)
        triggered.append(services.trigger_build(pipeline))
        connection.close()

    with raw_connection() as editor, raw_connection() as watcher:
        editor.execute("BEGIN")
        editor.execute("SELECT 1 FROM builds_pipeline WHERE id = %s FOR UPDATE", [pipeline.pk])
        triggering = threading.Thread(target=trigger)
        triggering.start()
        wait_until(lambda: trigger_pid and waiting_for_a_lock(watcher, trigger_pid[0]), timeout=10)
        (policy_id,) = editor.execute(
            "INSERT INTO concurrency_concurrencypolicy (name, group_key, max_running,"
            " queue_length, queue_timeout, on_queue_full, cancel_in_progress)"
            " VALUES ('late', 'late', 1, 5, 60, 'reject', false) RETURNING id"
        ).fetchone()
        editor.execute(
            "UPDATE builds_pipeline SET policy_id = %s WHERE id = %s", [policy_id, pipeline.pk]
        )
        editor.commit()
        triggering.join(timeout=20)
    (build,) = triggered
    build.refresh_from_db()
    assert (build.policy_id, build.concurrency_group) == (policy_id, "late")


def test_an_advance_aborted_by_a_deadlock_is_run_again():
    """The controller's advance (the build row, then the next stage's jobs) deadlocks with a
    transaction taking them the other way round: PostgreSQL aborts it, and it is run again
    at once, not left for the reconcile sweep."""
    build = services.trigger_build(make_pipeline("two-stages", TWO_STAGES))
    JobRun.objects.filter(build=build, stage_index=0).update(status="SUCCEEDED")
    results, advance_pid = [], []

    def advance():
        with connection.cursor() as cursor:  # this session detects the deadlock: its victim
            cursor.execute("SET deadlock_timeout = '100ms'")
            advance_pid.append(connection.connection.info.backend_pid)
        try:
            results.append(services.advance_build(build.pk))
        except Exception as exc:
            results.append(exc)
        finally:
            connection.close()

    with raw_connection() as other, raw_connection() as watcher:
        other.execute("SET deadlock_timeout = '10s'")
        other.execute("BEGIN")
        other.execute(
            "UPDATE builds_jobrun SET reason = reason WHERE build_id = %s AND stage_index = 1",
            [build.pk],
        )
        advancing = threading.Thread(target=advance)
        advancing.start()  # locks the build, then waits for the stage-1 job's row
        wait_until(lambda: advance_pid and waiting_for_a_lock(watcher, advance_pid[0]), timeout=10)
        # The other way round: the build's row, which the advance holds. A deadlock.
        other.execute("SELECT 1 FROM builds_build WHERE id = %s FOR UPDATE", [build.pk])
        other.rollback()
        advancing.join(timeout=20)
    assert results == ["RUNNING"]
    assert JobRun.objects.get(build=build, stage_index=1).status == "QUEUED"


TWO_STAGES = """
stages:
  - name: one
    jobs:
      - {id: a, runs-on: unit-tests, steps: [{run: "true"}]}
  - name: two
    jobs:
      - {id: b, runs-on: unit-tests, steps: [{run: "true"}]}
"""
