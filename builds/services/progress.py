"""A build on the move: queue a stage's jobs, advance stage by stage after a job ends,
finish the build, and start the queued builds its concurrency group has room for."""

import logging
from itertools import groupby

from django.db import connection, transaction
from django.utils import timezone

from builds.models import Build, JobRun, StepRun
from builds.statuses import (
    BUILD_FINAL,
    RUN_FAILED,
    RUN_FINAL,
    BuildStatus,
    RunStatus,
    build_allowed_from,
)
from ciproject import metrics
from ciproject.log_format import log_context
from ciproject.transactions import retried_on_conflict
from concurrency import services as concurrency
from dispatch import leases, placement

log = logging.getLogger(__name__)


@retried_on_conflict
def advance_build(build_id: int) -> str | None:
    """Move a build on after a job ended: queue the next stage, or finish the build (a
    CANCELLING one as CANCELED once nothing of it runs any more). Idempotent: the build row
    is locked and everything is re-read (so it is also run again when PostgreSQL aborts it
    for a deadlock, rather than left to the reconcile sweep)."""
    with log_context(build_id=build_id), transaction.atomic():
        build = Build.objects.select_for_update(no_key=True).filter(pk=build_id).first()
        if build is None or build.status not in (BuildStatus.RUNNING, BuildStatus.CANCELLING):
            return None
        return advance_locked(build)


def advance_after_commit(build_id: int) -> None:
    """advance_build once the caller's transaction commits (the caller may hold the build's
    row in the middle of an advance of its own)."""
    transaction.on_commit(lambda: advance_build(build_id))


def advance_locked(build: Build) -> str:
    """advance_build's decision, on a locked build; then the agent leases it no longer needs
    are released."""
    status = _decide(build)
    build.status = status if status in BUILD_FINAL else build.status
    leases.release_if_done(build)
    return status


def _decide(build: Build) -> str:
    jobs = JobRun.objects.filter(build_id=build.pk).values_list("stage_index", "status")
    if build.status == BuildStatus.CANCELLING:
        if any(status in (RunStatus.QUEUED, RunStatus.RUNNING) for _, status in jobs):
            return BuildStatus.CANCELLING
        finish_build(build, BuildStatus.CANCELED)
        return BuildStatus.CANCELED
    for stage_index, stage in groupby(sorted(jobs), key=lambda row: row[0]):
        statuses = [status for _, status in stage]
        if all(s in RUN_FINAL for s in statuses):
            if any(s in RUN_FAILED for s in statuses):
                finish_build(build, BuildStatus.FAILED)
                return BuildStatus.FAILED
            continue
        if RunStatus.PENDING in statuses:
            queue_stage(build.pk, stage_index)
        return BuildStatus.RUNNING
    finish_build(build, BuildStatus.SUCCEEDED)
    return BuildStatus.SUCCEEDED


def queue_stage(build_id: int, stage_index: int) -> None:
    """PENDING -> QUEUED for the stage's jobs, placed on agents once the transaction commits;
    the build's leased agents may run them too."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE builds_jobrun SET status = %s, queued_at = %s"
            " WHERE build_id = %s AND stage_index = %s AND status = %s"
            " RETURNING id, attempt, key, runs_on, reuse_of, takes_lease, agent, kept_workspace_on",
            [RunStatus.QUEUED, timezone.now(), build_id, stage_index, RunStatus.PENDING],
        )
        columns = [column.name for column in cursor.description]
        jobs = [JobRun(build_id=build_id, **dict(zip(columns, row, strict=True))) for row in cursor]
    _place(jobs)
    leases.pull_to_leased_agents(build_id)


def requeue_job(job_id: int, attempt: int) -> None:
    """Send a QUEUED job again (an agent handed it back: drained, or leased elsewhere)."""
    job = JobRun.objects.filter(pk=job_id, attempt=attempt, status=RunStatus.QUEUED).first()
    if job is not None:
        with transaction.atomic():
            _place([job], explain_waits=False)


def _place(jobs: list[JobRun], explain_waits: bool = True) -> None:
    for job, reason in placement.place(jobs, explain_waits):
        if fail_queued_job(job.pk, reason):
            advance_after_commit(job.build_id)


def fail_queued_job(job_id: int, reason: str) -> bool:
    """A QUEUED job that cannot run (no agent may take it) ends FAILED, saying why, and its
    steps are SKIPPED. The caller advances its build."""
    updated = JobRun.objects.filter(pk=job_id, status=RunStatus.QUEUED).update(
        status=RunStatus.FAILED, reason=reason, finished_at=timezone.now()
    )
    leases.forget_wait(job_id)
    if updated:
        StepRun.objects.filter(job_id=job_id, status=RunStatus.PENDING).update(
            status=RunStatus.SKIPPED
        )
    return bool(updated)


def finish_build(build: Build, status: str, reason: str = "") -> bool:
    """The build's final compare-and-set; what never ran is SKIPPED (CANCELED if cancelled).
    Its concurrency slot goes to the next queued build of its group once this commits (in a
    transaction of its own: the group is locked before builds, never after)."""
    now = timezone.now()
    fields = {"status": status, "finished_at": now} | ({"reason": reason} if reason else {})
    updated = Build.objects.filter(pk=build.pk, status__in=build_allowed_from(status)).update(
        **fields
    )
    if not updated:
        return False
    if build.concurrency_group:
        group = build.concurrency_group
        transaction.on_commit(lambda: start_queued_builds(group))
    leftover = RunStatus.CANCELED if status == BuildStatus.CANCELED else RunStatus.SKIPPED
    JobRun.objects.filter(build=build, status__in=(RunStatus.PENDING, RunStatus.QUEUED)).update(
        status=leftover, finished_at=now
    )
    StepRun.objects.filter(
        job__build=build, status__in=(RunStatus.PENDING, RunStatus.QUEUED)
    ).update(status=leftover)
    log.info(
        "build %s of %s ended %s", build.number, build.pipeline_id, status,
        extra={"build_id": build.pk},
    )  # fmt: skip
    if status == BuildStatus.CANCELED and build.cancel_requested_at:
        waited = (now - build.cancel_requested_at).total_seconds()
        transaction.on_commit(lambda: metrics.CANCEL_TO_CANCELED.observe(waited))
    return True


def start_queued_builds(group: str) -> list[int]:
    """Start the queued builds of `group` that its policy now has room for, oldest first (a
    build put back by a step retry before them). One transaction, the group locked."""
    with transaction.atomic():
        started = []
        for build_id in concurrency.builds_to_start(group):
            build = Build.objects.select_for_update(no_key=True).get(pk=build_id)
            updated = Build.objects.filter(
                pk=build_id, status__in=build_allowed_from(BuildStatus.RUNNING)
            ).update(status=BuildStatus.RUNNING, started_at=build.started_at or timezone.now())
            if updated:
                build.status = BuildStatus.RUNNING
                with log_context(build_id=build_id):
                    advance_locked(build)
                started.append(build_id)
    return started
