"""Build services on the real database: the status machine's compare-and-set, advancing,
and the reconcile sweep that re-drives a build whose advance message was lost."""

import pytest

from builds import services
from builds.models import Build, JobRun, StepRun
from builds.statuses import (
    BUILD_FINAL,
    BUILD_TRANSITIONS,
    RUN_FINAL,
    RUN_TRANSITIONS,
    BuildStatus,
    RunStatus,
    stage_status,
)
from tests.support import make_pipeline

# No agent serves "unit-tests": these builds' job messages are never run.
TWO_STAGES = """
stages:
  - name: one
    jobs:
      - {id: a, runs-on: unit-tests, steps: [{run: "true"}, {run: "true"}]}
      - {id: b, runs-on: unit-tests, steps: [{run: "true"}]}
  - name: two
    jobs:
      - {id: c, runs-on: unit-tests, steps: [{run: "true"}]}
"""


def test_transition_tables_are_closed():
    for to, sources in BUILD_TRANSITIONS.items():
        assert to in BuildStatus.values
        assert not sources & BUILD_FINAL, f"a final build status may not move to {to}"
    for to, sources in RUN_TRANSITIONS.items():
        assert to in RunStatus.values
        assert not sources & RUN_FINAL, f"a final job/step status may not move to {to}"
    assert set(BUILD_TRANSITIONS) == set(BuildStatus.values)
    assert set(RUN_TRANSITIONS) == set(RunStatus.values)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["PENDING", "PENDING"], "PENDING"),
        (["QUEUED", "PENDING"], "QUEUED"),
        (["RUNNING", "QUEUED"], "RUNNING"),
        (["SUCCEEDED", "QUEUED"], "RUNNING"),
        (["SUCCEEDED", "SUCCEEDED"], "SUCCEEDED"),
        (["SUCCEEDED", "TIMED_OUT"], "FAILED"),
        (["CANCELED", "SUCCEEDED"], "CANCELED"),
        (["SKIPPED", "SKIPPED"], "SKIPPED"),
    ],
)
def test_stage_status(statuses, expected):
    assert stage_status(statuses) == expected


def set_jobs(build, keys, status):
    JobRun.objects.filter(build=build, key__in=keys).update(status=status)
    StepRun.objects.filter(job__build=build, job__key__in=keys).update(status=status)


@pytest.mark.django_db
def test_advance_moves_stage_by_stage_and_finishes():
    build = services.trigger_build(make_pipeline("p", TWO_STAGES))
    assert services.advance_build(build.pk) == "RUNNING"  # stage one still queued
    set_jobs(build, ["a", "b"], RunStatus.SUCCEEDED)
    assert services.advance_build(build.pk) == "RUNNING"
    assert JobRun.objects.get(build=build, key="c").status == "QUEUED"
    set_jobs(build, ["c"], RunStatus.SUCCEEDED)
    assert services.advance_build(build.pk) == "SUCCEEDED"
    build.refresh_from_db()
    assert build.status == "SUCCEEDED"
    assert build.finished_at is not None
    assert services.advance_build(build.pk) is None  # idempotent: a final build stays


@pytest.mark.django_db
def test_a_failed_stage_fails_the_build_and_skips_the_rest():
    build = services.trigger_build(make_pipeline("p", TWO_STAGES))
    set_jobs(build, ["a"], RunStatus.FAILED)
    set_jobs(build, ["b"], RunStatus.SUCCEEDED)
    assert services.advance_build(build.pk) == "FAILED"
    c = JobRun.objects.get(build=build, key="c")
    assert c.status == "SKIPPED"
    assert set(c.steps.values_list("status", flat=True)) == {"SKIPPED"}


@pytest.mark.django_db
def test_compare_and_set_refuses_stale_attempts():
    build = services.trigger_build(make_pipeline("p", TWO_STAGES))
    job = JobRun.objects.get(build=build, key="a")
    assert services.start_job(job.pk, attempt=2, agent="x") is None  # not this attempt
    started = services.start_job(job.pk, attempt=1, agent="x")
    assert started.status == "RUNNING"
    assert services.start_job(job.pk, attempt=1, agent="y") is None  # a duplicate message
    step = started.steps.first()
    assert services.start_step(step)
    assert not services.finish_step(step, 2, RunStatus.SUCCEEDED, 0, {})  # stale attempt
    assert services.finish_step(step, 1, RunStatus.SUCCEEDED, 0, {"V": "1"})
    assert not services.finish_step(step, 1, RunStatus.FAILED, 1, {})  # already final
    step.refresh_from_db()
    assert (step.status, step.exit_code) == ("SUCCEEDED", 0)
    assert services.build_variables(build.pk) == {"V": "1"}


@pytest.mark.django_db
def test_finished_build_ignores_late_messages():
    build = services.trigger_build(make_pipeline("p", TWO_STAGES))
    Build.objects.filter(pk=build.pk).update(status=BuildStatus.FAILED)
    job = JobRun.objects.get(build=build, key="a")
    assert services.start_job(job.pk, attempt=1, agent="x") is None


@pytest.mark.django_db
def test_reconcile_re_drives_a_build_whose_advance_was_lost():
    build = services.trigger_build(make_pipeline("p", TWO_STAGES))
    busy = services.trigger_build(make_pipeline("q", TWO_STAGES))
    assert services.reconcile_running_builds() == []  # queued work: nothing is stalled
    set_jobs(build, ["a", "b"], RunStatus.SUCCEEDED)  # as if the advance message was lost
    assert services.reconcile_running_builds() == [build.pk]
    assert JobRun.objects.get(build=build, key="c").status == "QUEUED"
    set_jobs(build, ["c"], RunStatus.SUCCEEDED)
    assert services.reconcile_running_builds() == [build.pk]
    assert Build.objects.get(pk=build.pk).status == "SUCCEEDED"
    assert Build.objects.get(pk=busy.pk).status == "RUNNING"


@pytest.mark.django_db
def test_saving_a_stale_pipeline_keeps_the_build_numbers():
    pipeline = make_pipeline("p", TWO_STAGES)
    stale = type(pipeline).objects.get(pk=pipeline.pk)  # read before the trigger
    services.trigger_build(pipeline)
    services.save_pipeline("p", TWO_STAGES.replace("one", "first"), pipeline=stale)
    assert services.trigger_build(pipeline).number == 2


@pytest.mark.django_db(transaction=True)
def test_racing_starts_of_one_job_attempt_have_one_winner():
    """Two deliveries of the same job message, on two connections at the same instant."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from django.db import connection

    pipeline = make_pipeline("race", TWO_STAGES)
    for _ in range(20):
        build = services.trigger_build(pipeline)
        job_id = JobRun.objects.get(build=build, key="a").pk
        barrier = Barrier(2)

        def start(agent, job_id=job_id, barrier=barrier):
            try:
                barrier.wait()
                return services.start_job(job_id, 1, agent) is not None
            finally:
                connection.close()

        with ThreadPoolExecutor(2) as pool:
            winners = list(pool.map(start, ["x", "y"]))
        assert sorted(winners) == [False, True]
