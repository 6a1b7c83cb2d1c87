"""A build's life on the server: trigger, advance stage by stage, finish."""

import json
import logging
from itertools import groupby

from django.db import connection, transaction
from django.utils import timezone

from builds.definition import normalize_variables
from builds.models import Build, BuildVariable, JobRun, Pipeline, StepRun
from builds.statuses import (
    RUN_FAILED,
    RUN_FINAL,
    BuildStatus,
    RunStatus,
    build_allowed_from,
    run_allowed_from,
)
from ciproject import metrics
from ciproject.celery import app, job_queue

log = logging.getLogger(__name__)


def trigger_build(pipeline: Pipeline, variables=None, user=None) -> Build:
    """Create build N+1 of `pipeline` with its variables and status tree, and queue its first
    stage. Bad variables raise InvalidVariables before anything is written."""
    overrides = normalize_variables({} if variables is None else variables)
    with transaction.atomic():
        number, spec = _next_build_number(pipeline.pk)
        now = timezone.now()
        build = Build.objects.create(
            pipeline=pipeline,
            number=number,
            status=BuildStatus.RUNNING,
            spec=spec,
            triggered_by=user if user and user.is_authenticated else None,
            created_at=now,
            started_at=now,
        )
        _store_variables(build, spec["variables"], "pipeline", skip=overrides)
        _store_variables(build, overrides, "trigger")
        _create_tree(build, spec)
        _queue_stage(build.pk, 0)
    return build


def _next_build_number(pipeline_id: int) -> tuple[int, dict]:
    # The UPDATE row-locks the pipeline until commit, so concurrent triggers are serialized
    # here and the spec is read in the same statement.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE builds_pipeline SET last_build_number = last_build_number + 1"
            " WHERE id = %s RETURNING last_build_number, spec",
            [pipeline_id],
        )
        number, spec = cursor.fetchone()
    return number, json.loads(spec) if isinstance(spec, str) else spec


def _store_variables(build: Build, variables: dict, source: str, skip=()) -> None:
    BuildVariable.objects.bulk_create(
        BuildVariable(
            build=build, build_created_at=build.created_at, name=k, value=v, source=source
        )
        for k, v in variables.items()
        if k not in skip
    )


def _create_tree(build: Build, spec: dict) -> None:
    jobs, steps = [], []
    for stage_index, stage in enumerate(spec["stages"]):
        for job_spec in stage["jobs"]:
            job = JobRun(
                build=build,
                stage_index=stage_index,
                stage_name=stage["name"],
                key=job_spec["id"],
                runs_on=job_spec["runs_on"],
            )
            jobs.append(job)
            steps.extend((job, index, s) for index, s in enumerate(job_spec["steps"]))
    JobRun.objects.bulk_create(jobs)
    StepRun.objects.bulk_create(
        StepRun(
            job=job,
            index=index,
            name=s["name"],
            command=s["run"],
            timeout=s["timeout"],
            max_retries=s["retry"],
            continue_on_error=s["continue_on_error"],
        )
        for job, index, s in steps
    )


def _queue_stage(build_id: int, stage_index: int) -> None:
    """PENDING -> QUEUED for the stage's jobs, and publish them once the transaction commits."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE builds_jobrun SET status = %s, queued_at = %s"
            " WHERE build_id = %s AND stage_index = %s AND status = ANY(%s)"
            " RETURNING id, attempt, runs_on",
            [
                RunStatus.QUEUED,
                timezone.now(),
                build_id,
                stage_index,
                list(run_allowed_from(RunStatus.QUEUED)),
            ],
        )
        queued = cursor.fetchall()
    transaction.on_commit(lambda: _publish_jobs(queued))


def _publish_jobs(queued) -> None:
    for job_id, attempt, runs_on in queued:
        app.send_task(
            "agents.tasks.run_job",
            args=(job_id, attempt),
            queue=job_queue(runs_on),
            task_id=f"job-{job_id}-{attempt}",
        )


def advance_build(build_id: int) -> str | None:
    """Move a build on after a job ended: queue the next stage, or finish the build (a
    CANCELLING one as CANCELED once nothing of it runs any more). Idempotent: the build row
    is locked and everything is re-read."""
    with transaction.atomic():
        build = Build.objects.select_for_update().filter(pk=build_id).first()
        if build is None or build.status not in (BuildStatus.RUNNING, BuildStatus.CANCELLING):
            return None
        jobs = JobRun.objects.filter(build_id=build_id).values_list("stage_index", "status")
        if build.status == BuildStatus.CANCELLING:
            if any(status in (RunStatus.QUEUED, RunStatus.RUNNING) for _, status in jobs):
                return BuildStatus.CANCELLING
            _finish_build(build, BuildStatus.CANCELED)
            return BuildStatus.CANCELED
        for stage_index, stage in groupby(sorted(jobs), key=lambda row: row[0]):
            statuses = [status for _, status in stage]
            if all(s in RUN_FINAL for s in statuses):
                if any(s in RUN_FAILED for s in statuses):
                    _finish_build(build, BuildStatus.FAILED)
                    return BuildStatus.FAILED
                continue
            if RunStatus.PENDING in statuses:
                _queue_stage(build_id, stage_index)
            return BuildStatus.RUNNING
        _finish_build(build, BuildStatus.SUCCEEDED)
        return BuildStatus.SUCCEEDED


def reconcile_running_builds(limit: int = 500) -> list[int]:
    """Advance RUNNING builds that have nothing queued or running: their advance message was
    lost (broker restart, a controller killed mid-task). Safe to repeat: advance_build is."""
    stalled = (
        Build.objects.filter(status=BuildStatus.RUNNING)
        .exclude(jobs__status__in=(RunStatus.QUEUED, RunStatus.RUNNING))
        .order_by("id")
        .values_list("id", flat=True)[:limit]
    )
    ids = list(stalled)
    for build_id in ids:
        advance_build(build_id)
    return ids


def _finish_build(build: Build, status: str) -> None:
    """The build's final compare-and-set; what never ran is SKIPPED (CANCELED if cancelled)."""
    now = timezone.now()
    updated = Build.objects.filter(pk=build.pk, status__in=build_allowed_from(status)).update(
        status=status, finished_at=now
    )
    if not updated:
        return
    leftover = RunStatus.CANCELED if status == BuildStatus.CANCELED else RunStatus.SKIPPED
    JobRun.objects.filter(build=build, status__in=(RunStatus.PENDING, RunStatus.QUEUED)).update(
        status=leftover, finished_at=now
    )
    StepRun.objects.filter(
        job__build=build, status__in=(RunStatus.PENDING, RunStatus.QUEUED)
    ).update(status=leftover)
    log.info("build %s of %s ended %s", build.number, build.pipeline_id, status)
    if status == BuildStatus.CANCELED and build.cancel_requested_at:
        waited = (now - build.cancel_requested_at).total_seconds()
        transaction.on_commit(lambda: metrics.CANCEL_TO_CANCELED.observe(waited))
