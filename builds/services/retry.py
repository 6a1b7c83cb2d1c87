"""Step retry: re-run a failed step of a build in place, with attempt + 1, then the rest of
its job and of the build. A step retry is part of its build, never a new one: on a running
build it starts at once (no admission, no queue-length check, no new slot); on a finished
build it takes the build back to RUNNING if its group has a free slot, else to the head of
the group's queue. It is never refused for a full queue and never evicts anyone."""

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from builds.errors import StepNotFound, StepNotRetryable
from builds.models import Build, JobRun, StepRun
from builds.services.lifecycle import advance_locked
from builds.statuses import (
    BUILD_FINAL,
    BUILD_RETRY_TRANSITIONS,
    RETRYABLE_RUNS,
    RUN_FINAL,
    RUN_RETRY_TRANSITIONS,
    BuildStatus,
    RunStatus,
)
from concurrency import services as concurrency


def retry_step(build_id: int, step_id: int) -> StepRun:
    step = StepRun.objects.select_related("job__build").filter(pk=step_id).first()
    if step is None or step.job.build_id != build_id:
        raise StepNotFound(f"build {build_id} has no step {step_id}")
    group = step.job.build.concurrency_group
    with transaction.atomic():
        if group:
            concurrency.lock_group(group)  # the group before the build, as everywhere
        build = Build.objects.select_for_update().get(pk=build_id)
        job = JobRun.objects.select_for_update().get(pk=step.job_id)
        step = StepRun.objects.select_for_update().get(pk=step_id)
        check_step_retryable(build, job, step)
        _reset_job_from(job, step)
        if build.status in BUILD_FINAL:
            _reset_later_stages(build, job.stage_index)
            _take_back(build)
        if build.status == BuildStatus.RUNNING:
            advance_locked(build)  # queues the job again, on its retry queue
    step.refresh_from_db()
    return step


def check_step_retryable(build: Build, job: JobRun, step: StepRun) -> None:
    if step.status not in RETRYABLE_RUNS:
        raise StepNotRetryable(
            f"step {step.name!r} is {step.status}; only a FAILED, TIMED_OUT or CANCELED step"
            " can be retried",
            status=step.status,
        )
    if job.status not in RUN_FINAL:
        raise StepNotRetryable(
            f"job {job.key!r} is still {job.status}; retry the step once the job has ended",
            status=job.status,
        )
    if build.status not in BUILD_FINAL | {BuildStatus.RUNNING}:
        raise StepNotRetryable(
            f"build #{build.number} is {build.status}; a step can be retried while the build"
            " runs or once it has ended",
            status=build.status,
        )


def _reset_job_from(job: JobRun, step: StepRun) -> None:
    """The step and the steps after it run again; those that ran before get a new attempt,
    so their earlier logs stay apart. The steps before it keep their results."""
    later = StepRun.objects.filter(job=job, index__gte=step.index)
    later.filter(started_at__isnull=False).update(attempt=F("attempt") + 1)
    later.update(status=RunStatus.PENDING, exit_code=None, started_at=None, finished_at=None)
    updated = JobRun.objects.filter(
        pk=job.pk, status__in=RUN_RETRY_TRANSITIONS[RunStatus.QUEUED] | {RunStatus.SUCCEEDED}
    ).update(
        status=RunStatus.PENDING,
        attempt=F("attempt") + 1,
        agent="",
        reason="",
        queued_at=None,
        started_at=None,
        finished_at=None,
    )
    assert updated, "the job was locked and checked final"


def _reset_later_stages(build: Build, stage_index: int) -> None:
    """What a finished build skipped or cancelled after the retried stage runs again."""
    not_run = RUN_RETRY_TRANSITIONS[RunStatus.PENDING] - {RunStatus.FAILED, RunStatus.TIMED_OUT}
    jobs = JobRun.objects.filter(build=build, stage_index__gt=stage_index, status__in=not_run)
    StepRun.objects.filter(job__in=jobs, status__in=not_run).update(status=RunStatus.PENDING)
    jobs.update(status=RunStatus.PENDING, finished_at=None)


def _take_back(build: Build) -> None:
    """A finished build runs again if its group has room, else waits at the queue's head."""
    status = BuildStatus.RUNNING
    if build.concurrency_group:
        running = Build.objects.filter(
            concurrency_group=build.concurrency_group, status__in=concurrency.OCCUPYING
        ).count()
        if build.policy is None or running >= build.policy.max_running:
            status = BuildStatus.QUEUED
    now = timezone.now()
    Build.objects.filter(pk=build.pk, status__in=BUILD_RETRY_TRANSITIONS[status]).update(
        status=status,
        finished_at=None,
        reason="",
        cancel_requested_at=None,
        cancel_requested_by=None,
        enqueued_at=now if status == BuildStatus.QUEUED else build.enqueued_at,
        queue_priority=1 if status == BuildStatus.QUEUED else 0,
    )
    build.status = status
