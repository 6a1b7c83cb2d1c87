"""Running jobs and steps: called on the agents, fenced by attempt numbers."""

from django.db import connection, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from agents import leases
from builds.models import Build, BuildVariable, JobRun, StepLogChunk, StepRun
from builds.statuses import BuildStatus, RunStatus, run_allowed_from
from ciproject.celery import CONTROLLER_QUEUE, app, publish

LATE_NOTE_SEQ = 1_000_000  # a note the server adds to a step's log sorts after the agent's


def _build_running(build_id) -> Exists:
    """`the build is RUNNING` as a correlated subquery. A join (build__status=...) would make
    Django rewrite the UPDATE as `WHERE id IN (SELECT ...)`, and PostgreSQL re-checks only
    that after waiting on a row lock, so two racing compare-and-sets could both win."""
    return Exists(Build.objects.filter(pk=build_id, status=BuildStatus.RUNNING))


HAND_BACK = "hand back"


def start_job(job_id: int, attempt: int, agent: str, draining=False) -> JobRun | str | None:
    """QUEUED -> RUNNING for this attempt on `agent`. Returns the job; None if the message is
    stale; HAND_BACK if this agent may not run it now (it is drained, or leased to another
    build, or the job takes a lease another build holds): another agent will."""
    with transaction.atomic():
        job = JobRun.objects.filter(pk=job_id, attempt=attempt)
        job = job.values("build_id", "takes_lease", "reuse_of", "agent").first()
        if job is None:
            return None
        bound = job["reuse_of"] or (job["takes_lease"] and job["agent"])  # sent here on purpose
        if draining and not bound:
            return HAND_BACK
        leases.lock_agent(agent)  # its lease is decided by one start (or release) at a time
        held_by = leases.holder(agent)
        if held_by not in (None, job["build_id"]):
            return HAND_BACK
        if job["takes_lease"]:
            if not leases.acquire(agent, job["build_id"]):
                return HAND_BACK
            leases.pull_jobs(agent, job["build_id"])
        # QUEUED only: a job is sent once its stage is queued, so a message for a PENDING job
        # (a duplicate, sent early) must not start it before the stages ahead of it end.
        updated = JobRun.objects.filter(
            _build_running(OuterRef("build_id")),
            pk=job_id,
            attempt=attempt,
            status=RunStatus.QUEUED,
        ).update(status=RunStatus.RUNNING, agent=agent, reason="", started_at=timezone.now())
        if not updated:
            transaction.set_rollback(True)  # and with it any lease taken above
            return None
    return JobRun.objects.select_related("build").get(pk=job_id)


def start_step(step: StepRun) -> bool:
    """PENDING or QUEUED -> RUNNING, at the step's current attempt, while the build runs."""
    now = timezone.now()
    updated = StepRun.objects.filter(
        _build_running(step.job.build_id),
        pk=step.pk,
        attempt=step.attempt,
        status__in=run_allowed_from(RunStatus.RUNNING),
    ).update(status=RunStatus.RUNNING, started_at=now)
    step.status, step.started_at = RunStatus.RUNNING, now
    return bool(updated)


def next_attempt(step: StepRun) -> bool:
    """An automatic retry: a RUNNING step whose attempt failed goes on at attempt + 1."""
    now = timezone.now()
    updated = StepRun.objects.filter(
        _build_running(step.job.build_id),
        pk=step.pk,
        attempt=step.attempt,
        status=RunStatus.RUNNING,
    ).update(attempt=step.attempt + 1, exit_code=None, started_at=now)
    if updated:
        step.attempt, step.started_at = step.attempt + 1, now
    return bool(updated)


def append_log(step_id: int, attempt: int, seq: int, text: str) -> None:
    """Idempotent: a chunk sent again (its commit went through, the answer was lost with the
    connection) is already there and is ignored."""
    chunk = StepLogChunk(step_id=step_id, attempt=attempt, seq=seq, text=text)
    StepLogChunk.objects.bulk_create([chunk], ignore_conflicts=True)


def _cancel_wins(build_id: int, status: str) -> str:
    """While its build is CANCELLING, whatever ends is recorded CANCELED. The build row lock
    orders this against the cancel request: a step that ends after it is cancelled."""
    build_status = (
        Build.objects.select_for_update(no_key=True)
        .values_list("status", flat=True)
        .get(pk=build_id)
    )
    return RunStatus.CANCELED if build_status == BuildStatus.CANCELLING else status


def finish_step(step: StepRun, attempt: int, status: str, exit_code, variables: dict) -> str | None:
    """RUNNING -> final for this attempt, with the variables it set. Returns the status
    recorded, or None if the attempt is no longer the step's (stale)."""
    with transaction.atomic():
        build = step.job.build
        status = _cancel_wins(build.pk, status)
        updated = StepRun.objects.filter(
            pk=step.pk, attempt=attempt, status__in=run_allowed_from(status)
        ).update(status=status, exit_code=exit_code, finished_at=timezone.now())
        if not updated:
            return None
        if variables and status != RunStatus.CANCELED:
            _upsert_variables(build.pk, build.created_at, variables, source="step")
    return status


def _upsert_variables(build_id, build_created_at, variables: dict, source: str) -> None:
    """Set variables; the first time a step overwrites a triggered one, keep the triggered
    value aside (a full retry restores it)."""
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO builds_buildvariable AS v"
            " (build_created_at, build_id, name, value, source) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (build_created_at, build_id, name)"
            " DO UPDATE SET value = EXCLUDED.value, source = EXCLUDED.source,"
            " triggered_value = CASE WHEN v.source = 'step' THEN v.triggered_value"
            " ELSE v.value END,"
            " triggered_source = CASE WHEN v.source = 'step' THEN v.triggered_source"
            " ELSE v.source END",
            [(build_created_at, build_id, k, v, source) for k, v in variables.items()],
        )


def finish_job(job: JobRun, status: str, reason: str = "") -> bool:
    """RUNNING -> final for this attempt; what is left of it is skipped; the controller is
    told to advance the build."""
    with transaction.atomic():
        now = timezone.now()
        if _cancel_wins(job.build_id, status) != status:
            status, reason = RunStatus.CANCELED, reason or "the build was cancelled"
        updated = JobRun.objects.filter(
            pk=job.pk, attempt=job.attempt, status__in=run_allowed_from(status)
        ).update(status=status, reason=reason, finished_at=now)
        if not updated:
            return False
        # What never ran is SKIPPED, or CANCELED with the job.
        leftover = RunStatus.CANCELED if status == RunStatus.CANCELED else RunStatus.SKIPPED
        StepRun.objects.filter(job=job, status__in=(RunStatus.PENDING, RunStatus.QUEUED)).update(
            status=leftover
        )
        # A step still RUNNING here was cut short by an error on the agent.
        StepRun.objects.filter(job=job, status=RunStatus.RUNNING).update(
            status=RunStatus.CANCELED if status == RunStatus.CANCELED else RunStatus.FAILED,
            finished_at=now,
        )
        build_id = job.build_id
        transaction.on_commit(
            lambda: publish(
                app.send_task,
                "builds.tasks.advance_build",
                args=(build_id,),
                queue=CONTROLLER_QUEUE,
            )
        )
    return True


def build_variables(build_id: int) -> dict[str, str]:
    # Filtered by the partition key too, so PostgreSQL reads one partition only.
    created_at = Build.objects.filter(pk=build_id).values("created_at")[:1]
    return dict(
        BuildVariable.objects.filter(build_created_at=created_at, build_id=build_id)
        .order_by("name")
        .values_list("name", "value")
    )


def step_log(step: StepRun, attempt: int | None = None) -> str:
    chunks = StepLogChunk.objects.filter(step=step, attempt=attempt or step.attempt)
    return "".join(chunks.values_list("text", flat=True))


def fail_jobs_on_agent(agent: str, reason: str) -> list[int]:
    """The jobs recorded as RUNNING on a lost agent end FAILED (CANCELED if their build is
    being cancelled) with `reason`; their builds move on. The agent, if it still runs them
    somewhere, is told to stop: its late results are fenced off by the job's status."""
    from builds.services.cancellation import stop_job_on_agent

    failed = []
    for job in JobRun.objects.filter(agent=agent, status=RunStatus.RUNNING):
        cut_short = list(job.steps.filter(status=RunStatus.RUNNING).values_list("id", "attempt"))
        if not finish_job(job, RunStatus.FAILED, reason):
            continue
        # After anything the agent may still have written, should it come back.
        note = f"\n[ciproject] {reason}\n"
        StepLogChunk.objects.bulk_create(
            StepLogChunk(step_id=step_id, attempt=attempt, seq=LATE_NOTE_SEQ, text=note)
            for step_id, attempt in cut_short
        )
        stop_job_on_agent(job.pk, job.attempt, agent)
        failed.append(job.pk)
    return failed
