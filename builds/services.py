"""Every change of state of pipelines, builds, jobs and steps. Each public function is
one transaction; each status change is a compare-and-set through builds.statuses; messages
leave with transaction.on_commit (DESIGN.md principles 1 and 2)."""

import json
import logging
import re
from itertools import groupby

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from builds.definition import normalize_variables, parse_definition
from builds.errors import InvalidPipeline, PipelineNameTaken
from builds.models import Build, BuildVariable, JobRun, Pipeline, StepLogChunk, StepRun
from builds.statuses import (
    RUN_FAILED,
    RUN_FINAL,
    BuildStatus,
    RunStatus,
    build_allowed_from,
    run_allowed_from,
)
from ciproject.celery import CONTROLLER_QUEUE, app, job_queue

log = logging.getLogger(__name__)

PIPELINE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


# Pipelines ---------------------------------------------------------------------------


def validate_pipeline_name(name) -> str:
    if not isinstance(name, str) or not PIPELINE_NAME_RE.fullmatch(name):
        raise InvalidPipeline(
            "name: 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def save_pipeline(name: str, definition: str, pipeline: Pipeline | None = None) -> Pipeline:
    """Create a pipeline, or update `pipeline`; nothing is stored unless all of it is valid."""
    name = validate_pipeline_name(name)
    spec = parse_definition(definition)
    pipeline = pipeline or Pipeline()
    pipeline.name, pipeline.definition, pipeline.spec = name, definition, spec
    try:
        with transaction.atomic():
            pipeline.save()
    except IntegrityError:
        raise PipelineNameTaken(f"name: a pipeline named {name!r} already exists") from None
    return pipeline


# Triggering ----------------------------------------------------------------------------


def trigger_build(pipeline: Pipeline, variables=None, user=None) -> Build:
    """Create build N+1 of `pipeline` with its variables and status tree, and queue its first
    stage. Bad variables raise InvalidVariables before anything is written."""
    overrides = normalize_variables(variables or {})
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


# Advancing ----------------------------------------------------------------------------


def advance_build(build_id: int) -> str | None:
    """Move a RUNNING build on after a job ended: queue the next stage, or finish the build.
    Idempotent: the build row is locked and everything is re-read."""
    with transaction.atomic():
        build = Build.objects.select_for_update().filter(pk=build_id).first()
        if build is None or build.status != BuildStatus.RUNNING:
            return None
        jobs = JobRun.objects.filter(build_id=build_id).values_list("stage_index", "status")
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
    now = timezone.now()
    updated = Build.objects.filter(pk=build.pk, status__in=build_allowed_from(status)).update(
        status=status, finished_at=now
    )
    if not updated:
        return
    JobRun.objects.filter(build=build, status__in=run_allowed_from(RunStatus.SKIPPED)).update(
        status=RunStatus.SKIPPED, finished_at=now
    )
    StepRun.objects.filter(job__build=build, status__in=run_allowed_from(RunStatus.SKIPPED)).update(
        status=RunStatus.SKIPPED
    )
    log.info("build %s of %s ended %s", build.number, build.pipeline_id, status)


# Running jobs and steps (called on the agents) ----------------------------------------


def start_job(job_id: int, attempt: int, agent: str) -> JobRun | None:
    """QUEUED -> RUNNING for this attempt on `agent`; None if the message is stale."""
    updated = JobRun.objects.filter(
        pk=job_id,
        attempt=attempt,
        status__in=run_allowed_from(RunStatus.RUNNING),
        build__status=BuildStatus.RUNNING,
    ).update(status=RunStatus.RUNNING, agent=agent, started_at=timezone.now())
    if not updated:
        return None
    return JobRun.objects.select_related("build").get(pk=job_id)


def start_step(step: StepRun) -> bool:
    """PENDING or QUEUED -> RUNNING, at the step's current attempt."""
    now = timezone.now()
    updated = StepRun.objects.filter(
        pk=step.pk, attempt=step.attempt, status__in=run_allowed_from(RunStatus.RUNNING)
    ).update(status=RunStatus.RUNNING, started_at=now)
    step.status, step.started_at = RunStatus.RUNNING, now
    return bool(updated)


def next_attempt(step: StepRun) -> bool:
    """An automatic retry: a RUNNING step whose attempt failed goes on at attempt + 1."""
    now = timezone.now()
    updated = StepRun.objects.filter(
        pk=step.pk, attempt=step.attempt, status=RunStatus.RUNNING
    ).update(attempt=step.attempt + 1, exit_code=None, started_at=now)
    if updated:
        step.attempt, step.started_at = step.attempt + 1, now
    return bool(updated)


def append_log(step_id: int, attempt: int, seq: int, text: str) -> None:
    StepLogChunk.objects.create(step_id=step_id, attempt=attempt, seq=seq, text=text)


def finish_step(step: StepRun, attempt: int, status: str, exit_code, variables: dict) -> bool:
    """RUNNING -> final for this attempt; the variables it set are stored with it."""
    with transaction.atomic():
        updated = StepRun.objects.filter(
            pk=step.pk, attempt=attempt, status__in=run_allowed_from(status)
        ).update(status=status, exit_code=exit_code, finished_at=timezone.now())
        if updated and variables:
            build = step.job.build
            _upsert_variables(build.pk, build.created_at, variables, source="step")
    return bool(updated)


def _upsert_variables(build_id, build_created_at, variables: dict, source: str) -> None:
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO builds_buildvariable (build_created_at, build_id, name, value, source)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (build_created_at, build_id, name)"
            " DO UPDATE SET value = EXCLUDED.value, source = EXCLUDED.source",
            [(build_created_at, build_id, k, v, source) for k, v in variables.items()],
        )


def finish_job(job: JobRun, status: str, reason: str = "") -> bool:
    """RUNNING -> final for this attempt; what is left of it is skipped; the controller is
    told to advance the build."""
    with transaction.atomic():
        now = timezone.now()
        updated = JobRun.objects.filter(
            pk=job.pk, attempt=job.attempt, status__in=run_allowed_from(status)
        ).update(status=status, reason=reason, finished_at=now)
        if not updated:
            return False
        StepRun.objects.filter(job=job, status__in=run_allowed_from(RunStatus.SKIPPED)).update(
            status=RunStatus.SKIPPED
        )
        build_id = job.build_id
        transaction.on_commit(
            lambda: app.send_task(
                "builds.tasks.advance_build", args=(build_id,), queue=CONTROLLER_QUEUE
            )
        )
    return True


# Reading ------------------------------------------------------------------------------


def build_variables(build_id: int) -> dict[str, str]:
    return dict(
        BuildVariable.objects.filter(build_id=build_id)
        .order_by("name")
        .values_list("name", "value")
    )


def step_log(step: StepRun, attempt: int | None = None) -> str:
    chunks = StepLogChunk.objects.filter(step=step, attempt=attempt or step.attempt)
    return "".join(chunks.values_list("text", flat=True))
