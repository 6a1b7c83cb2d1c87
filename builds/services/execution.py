"""Running jobs and steps: what the agents call, fenced by attempt numbers."""

import contextlib
import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Exists, F, Q, Value, When
from django.db.models.functions import Now
from django.utils import timezone

from builds import partitions
from builds.errors import BuildVariablesMissing
from builds.models import Build, BuildVariable, JobRun, StepRun
from builds.services.logs import add_late_note
from builds.statuses import (
    BUILD_FINAL,
    KEEPS_WORKSPACE,
    BuildStatus,
    RunStatus,
    run_allowed_from,
)
from ciproject.log_format import log_context
from dispatch import leases, messages

log = logging.getLogger(__name__)


def _build_running(build_id) -> Exists:
    """`the build is RUNNING` as a correlated subquery. A join (build__status=...) would make
    Django rewrite the UPDATE as `WHERE id IN (SELECT ...)`, and PostgreSQL re-checks only
    that after waiting on a row lock, so two racing compare-and-sets could both win."""
    return Exists(Build.objects.filter(pk=build_id, status=BuildStatus.RUNNING))


def _build_cleaning(build_id) -> Exists:
    """`the build is being cancelled, not forced`: its jobs' cleanup steps may run."""
    return Exists(
        Build.objects.filter(
            pk=build_id, status=BuildStatus.CANCELLING, cancel_forced_at__isnull=True
        )
    )


class HandBack(Exception):  # an outcome, not an error: no "Error" in its name
    """This agent may not run the job now (it is drained, or leased to another build, or the
    job takes a lease another build holds): it goes back to the queue for another agent."""


_RUNNING = (
    "EXISTS (SELECT 1 FROM builds_build b WHERE b.id = j.build_id AND b.status = %(running)s)"
)
_CLEANING = (
    "EXISTS (SELECT 1 FROM builds_build b WHERE b.id = j.build_id AND b.status = %(cancelling)s"
    " AND b.cancel_forced_at IS NULL)"
)
# QUEUED -> RUNNING while the build runs, or while its cancel lets the job's cleanup run (the
# job then keeps its cleanup_deadline: how long it has, by the database's clock, returned as
# cleanup_left). The build's status as correlated subqueries, as in _build_running.
_START = f"""
UPDATE builds_jobrun j SET status = %(running)s, agent = %(agent)s, reason = '',
    started_at = %(now)s, kept_workspace_on = '',
    cleanup_deadline = CASE WHEN {_RUNNING} THEN NULL ELSE j.cleanup_deadline END
WHERE j.id = %(id)s AND j.attempt = %(attempt)s AND j.status = %(queued)s
    AND ({_RUNNING} OR ({_CLEANING} AND j.cleanup_deadline > statement_timestamp()))
RETURNING j.*, j.cleanup_deadline - statement_timestamp() AS cleanup_left
"""


def start_job(job_id: int, attempt: int, agent: str, draining=False) -> JobRun | None:
    """QUEUED -> RUNNING for this attempt on `agent`. Returns the job, or None if the message
    is stale; raises HandBack if this agent may not run it now."""
    with transaction.atomic():
        job = JobRun.objects.filter(pk=job_id, attempt=attempt).select_related("build").first()
        if job is None:
            return None
        if draining and not job.bound:  # a bound job was sent here on purpose
            raise HandBack
        # Its lease is decided by one start (or release) at a time: the agent's row locked.
        held_by, labels = leases.lock_for_start(agent)
        if held_by not in (None, job.build_id):
            raise HandBack
        if job.takes_lease:
            if held_by is None and not leases.acquire(agent, job.build_id):
                raise HandBack
            leases.pull_jobs(agent, job.build_id, labels)
        # QUEUED only: a job is sent once its stage is queued, so a message for a PENDING job
        # (a duplicate, sent early) must not start it before the stages ahead of it end.
        params = {
            "id": job_id, "attempt": attempt, "agent": agent, "now": timezone.now(),
            "queued": RunStatus.QUEUED, "running": RunStatus.RUNNING,
            "cancelling": BuildStatus.CANCELLING,
        }  # fmt: skip
        started = list(JobRun.objects.raw(_START, params))
        if not started:
            transaction.set_rollback(True)  # and with it any lease taken above
            return None
    started[0].build = job.build  # read in this transaction; nothing of it a start changes
    return started[0]


def start_step(step: StepRun, cleanup: bool = False) -> bool:
    """PENDING or QUEUED -> RUNNING, at the step's current attempt, while the build runs
    (a cleanup step: while its cancel is not forced)."""
    now = timezone.now()
    build_id = step.job.build_id
    if cleanup:  # and its job attempt is still running (a forced end may have come first)
        runs = JobRun.objects.filter(
            pk=step.job_id, attempt=step.job.attempt, status=RunStatus.RUNNING
        )
        allowed = (_build_cleaning(build_id), Exists(runs))
    else:
        allowed = (_build_running(build_id),)
    updated = StepRun.objects.filter(
        *allowed,
        pk=step.pk,
        attempt=step.attempt,
        status__in=run_allowed_from(RunStatus.RUNNING),
    ).update(status=RunStatus.RUNNING, started_at=now)
    step.status, step.started_at = RunStatus.RUNNING, now
    return bool(updated)


def cleanup_deadline():
    """When a job's cleanup must be over: its cleanup-timeout from now, by the database's
    clock (as the cancel watchdog's)."""
    return Now() + F("cleanup_timeout") * timedelta(seconds=1)


def begin_cleanup(job: JobRun) -> bool:
    """A job stopped by its build's cancel runs its cleanup steps now, until its
    cleanup_deadline (the cancel watchdog waits for it). False if the cancel was forced, or
    the attempt is no longer this agent's."""
    return bool(
        JobRun.objects.filter(
            _build_cleaning(job.build_id),
            pk=job.pk,
            attempt=job.attempt,
            status=RunStatus.RUNNING,
            agent=job.agent,
        ).update(cleanup_deadline=cleanup_deadline())
    )


def skip_step(step: StepRun, reason: str) -> bool:
    """PENDING -> SKIPPED (its condition was false), while the build runs."""
    return bool(
        StepRun.objects.filter(
            _build_running(step.job.build_id),
            pk=step.pk,
            attempt=step.attempt,
            status__in=run_allowed_from(RunStatus.SKIPPED),
        ).update(status=RunStatus.SKIPPED, reason=reason, finished_at=timezone.now())
    )


def run_steps_again(steps) -> None:
    """Steps that run again: PENDING, their results cleared, each that had started at
    attempt + 1 (so its new log and results never mix with the old ones)."""
    steps.filter(started_at__isnull=False).update(attempt=F("attempt") + 1)
    steps.update(
        status=RunStatus.PENDING, exit_code=None, reason="", started_at=None, finished_at=None
    )


def run_jobs_again(steps, jobs, **job_fields) -> int:
    """Steps and jobs that run again: PENDING, their results cleared, each job at attempt + 1
    (the steps: see run_steps_again), with `job_fields` besides. Returns the jobs updated."""
    run_steps_again(steps)
    again = {
        "status": RunStatus.PENDING,
        "attempt": F("attempt") + 1,
        "reason": "",
        "queued_at": None,
        "started_at": None,
        "finished_at": None,
        "stop_requested_at": None,
        "cleanup_deadline": None,
    }
    return jobs.update(**again | job_fields)


def rerun_from_first_step(job: JobRun, note: str) -> bool:
    """A job continued by a step retry finds the workspace its earlier steps worked in gone:
    those steps run again first (each that had started at attempt + 1), the first one's log
    and the job's reason saying why. False if the attempt is no longer this agent's."""
    with transaction.atomic():
        if not JobRun.objects.filter(
            pk=job.pk, attempt=job.attempt, status=RunStatus.RUNNING, agent=job.agent
        ).update(reason=note):
            return False
        kept = StepRun.objects.filter(job=job).exclude(
            status__in=(RunStatus.PENDING, RunStatus.QUEUED)
        )
        ids = list(kept.order_by("index").values_list("pk", flat=True))
        steps = StepRun.objects.filter(pk__in=ids)  # not `kept`: they are PENDING after this
        run_steps_again(steps)
        add_late_note(list(steps.filter(pk__in=ids[:1]).values_list("pk", "attempt")), note)
    job.reason = note
    return True


def next_attempt(step: StepRun) -> bool:
    """An automatic retry: a RUNNING step whose attempt failed goes on at attempt + 1.
    Idempotent: sent again after its commit went through (the answer was lost with the
    connection), it finds the step at attempt + 1 and says so."""
    now = timezone.now()
    updated = StepRun.objects.filter(
        _build_running(step.job.build_id),
        pk=step.pk,
        attempt=step.attempt,
        status=RunStatus.RUNNING,
    ).update(attempt=step.attempt + 1, exit_code=None, started_at=now)
    if not updated:
        updated = StepRun.objects.filter(
            _build_running(step.job.build_id),
            pk=step.pk,
            attempt=step.attempt + 1,
            status=RunStatus.RUNNING,
            exit_code=None,
        ).exists()
    if updated:
        step.attempt, step.started_at = step.attempt + 1, now
    return bool(updated)


# While its build is CANCELLING, whatever ends is recorded CANCELED (the own ending of a
# cleanup step, or of a job run after the cancel, counts unless the cancel was forced). The
# build row lock orders this against the cancel request: what ends after it is cancelled.
_CANCEL_WINS = (
    "SELECT status = %(cancelling)s AND NOT (%(cleanup)s AND cancel_forced_at IS NULL) AS wins"
    " FROM builds_build WHERE id = %(build)s FOR NO KEY UPDATE"
)


def _cancel_wins_params(build_id: int, cleanup: bool) -> dict:
    return {"build": build_id, "cleanup": cleanup, "cancelling": BuildStatus.CANCELLING}


def _cancel_wins(build_id: int, status: str, cleanup: bool = False) -> str:
    """The status to record for an ending of `status` (see _CANCEL_WINS), the build locked."""
    with connection.cursor() as cursor:
        cursor.execute(_CANCEL_WINS, _cancel_wins_params(build_id, cleanup))
        row = cursor.fetchone()
    if row is None:
        raise Build.DoesNotExist(f"build {build_id}")
    return RunStatus.CANCELED if row[0] else status


# finish_step's compare-and-set in one statement, the build's row locked first.
_FINISH_STEP = f"""
WITH b AS ({_CANCEL_WINS}), updated AS (
    UPDATE builds_steprun s
    SET status = CASE WHEN b.wins THEN %(canceled)s ELSE %(status)s END,
        exit_code = %(exit_code)s, finished_at = %(now)s
    FROM b
    WHERE s.id = %(id)s AND s.attempt = %(attempt)s
        AND s.status = ANY(
            CASE WHEN b.wins THEN %(from_canceled)s::text[] ELSE %(from_status)s::text[] END
        )
    RETURNING s.status
)
SELECT b.wins, (SELECT status FROM updated) FROM b
"""


def finish_step(
    step: StepRun, attempt: int, status: str, exit_code, variables: dict, cleanup: bool = False
) -> str | None:
    """RUNNING -> final for this attempt, with the variables it set (none of a cleanup
    step's). Returns the status recorded, or None if the attempt is no longer the step's
    (stale). The same result sent again (its first commit went through, the answer was
    lost) is recorded already: that status is returned."""
    build = step.job.build
    variables = {} if cleanup else variables
    params = _cancel_wins_params(build.pk, cleanup) | {
        "id": step.pk, "attempt": attempt, "status": status, "exit_code": exit_code,
        "now": timezone.now(), "canceled": RunStatus.CANCELED,
        "from_status": list(run_allowed_from(status)),
        "from_canceled": list(run_allowed_from(RunStatus.CANCELED)),
    }  # fmt: skip
    # One statement, its own transaction, unless variables are written with it.
    with transaction.atomic() if variables else contextlib.nullcontext():
        with connection.cursor() as cursor:
            cursor.execute(_FINISH_STEP, params)
            cancel_wins, recorded = cursor.fetchone() or (False, None)
        result, status = status, RunStatus.CANCELED if cancel_wins else status
        if recorded is None:
            recorded = StepRun.objects.filter(pk=step.pk, attempt=attempt)
            recorded = recorded.values_list("status", "exit_code").first()
            return recorded[0] if recorded in {(result, exit_code), (status, exit_code)} else None
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


def _stopped_by_server(job: JobRun) -> str:
    """Why the server stopped this attempt (fail-fast), or ""."""
    stopped = JobRun.objects.filter(pk=job.pk, attempt=job.attempt, stop_requested_at__isnull=False)
    return stopped.values_list("reason", flat=True).first() or ""


def finish_job(job: JobRun, status: str, reason: str = "", after_cancel: bool = False) -> bool:
    """RUNNING -> final for this attempt; what is left of it is skipped; the controller is
    told to advance the build. True if recorded, or found recorded already with the same
    status and reason (a write sent again after its commit went through). A job that ran
    `after_cancel` of its build keeps its own ending, unless the cancel was forced."""
    with transaction.atomic():
        now = timezone.now()
        result = (status, reason)
        if _cancel_wins(job.build_id, status, cleanup=after_cancel) != status:
            status, reason = RunStatus.CANCELED, reason or "the build was cancelled"
        elif stopped := _stopped_by_server(job):
            status, reason = RunStatus.CANCELED, stopped
        updated = JobRun.objects.filter(
            pk=job.pk, attempt=job.attempt, status__in=run_allowed_from(status)
        ).update(
            status=status,
            reason=reason,
            finished_at=now,
            kept_workspace_on=job.agent if job.keeps_workspace_after(status) else "",
        )
        if not updated:
            recorded = JobRun.objects.filter(pk=job.pk, attempt=job.attempt)
            recorded = recorded.values_list("status", "reason").first()
            return recorded in {result, (status, reason)}
        # What never ran is SKIPPED, or CANCELED with the job; a step still RUNNING here was
        # cut short by an error on the agent. One statement for both.
        cancelled = status == RunStatus.CANCELED
        cut_short = Q(status=RunStatus.RUNNING)
        StepRun.objects.filter(
            job=job, status__in=(RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING)
        ).update(
            status=Case(
                When(cut_short, then=Value(RunStatus.CANCELED if cancelled else RunStatus.FAILED)),
                default=Value(RunStatus.CANCELED if cancelled else RunStatus.SKIPPED),
            ),
            finished_at=Case(When(cut_short, then=Value(now)), default=F("finished_at")),
        )
        messages.advance_build(job.build_id)
    return True


def lease_workspaces_wanted(build_id: int, agent: str) -> bool:
    """Whether the workspaces a build's lease kept on `agent` are worth keeping once the
    lease has ended (for AGENT_KEEP_FAILED_WORKSPACE_SECONDS): a step retry may run jobs in
    them again, as the build ended otherwise than SUCCEEDED or a job that worked in them
    failed."""
    if settings.AGENT_KEEP_FAILED_WORKSPACE_SECONDS <= 0:
        return False
    ended_badly = BUILD_FINAL - {BuildStatus.SUCCEEDED}
    return (
        Build.objects.filter(pk=build_id, status__in=ended_badly).exists()
        or JobRun.objects.using_lease()
        .filter(build_id=build_id, agent=agent, status__in=KEEPS_WORKSPACE)
        .exists()
    )


def build_variables(build: Build | int) -> dict[str, str]:
    """The build's variables (of a Build as read, or of an id). Raises BuildVariablesMissing
    when its partition is gone: a job never runs with its variables silently missing."""
    if not isinstance(build, Build):
        build = Build.objects.only("number", "created_at").get(pk=build)
    # Filtered by the partition key too, so PostgreSQL reads one partition only.
    variables = dict(
        BuildVariable.objects.filter(build_created_at=build.created_at, build_id=build.pk)
        .order_by("name")
        .values_list("name", "value")
    )
    # No row may mean no variable, or no partition: only then is the catalog asked.
    if variables or partitions.partition_exists_for(build.created_at):
        return variables
    raise BuildVariablesMissing(
        f"the variables of build #{build.number} are gone: the partition holding builds"
        f" created on {build.created_at:%Y-%m-%d} was purged (VARIABLE_RETENTION_DAYS)"
    )


def end_untracked_jobs(agent: str, tracked: set[tuple[int, int]], started_before) -> list[int]:
    """The agent's heartbeat: end the jobs recorded RUNNING on it that it no longer runs
    (their end could not be recorded). The agent tracks a job before start_job stamps
    started_at, and until its end is recorded; so a job started before `started_before`
    (taken before `tracked` was read) and not in `tracked` has ended there."""
    ended = []
    running = JobRun.objects.filter(
        agent=agent, status=RunStatus.RUNNING, started_at__lt=started_before
    )
    for job in running.select_related("build"):
        if (job.pk, job.attempt) in tracked:
            continue
        reason = f"agent error on {agent}: its end could not be recorded (see the agent's log)"
        with log_context(build_id=job.build_id, job_id=job.pk, attempt=job.attempt):
            if finish_job(job, RunStatus.FAILED, reason):
                log.warning("job %s attempt %s: %s; ended now", job.pk, job.attempt, reason)
                ended.append(job.pk)
    return ended


def ended_elsewhere(agent: str, attempts: set[tuple[int, int]]) -> dict[tuple[int, int], bool]:
    """The agent's heartbeat: of the job attempts it runs, those that are no longer its to
    run (the server ended them: a lost agent, a forced cancel; a retry moved the job on; or
    their build is being cancelled, or fail-fast stops them). The agent stops them, whether
    or not a stop message ever reached it. An attempt still QUEUED is one about to start (the
    agent tracks it before start_job). Each with whether the stop is forced: only a cancel
    that is not lets the job run its cleanup steps, and a job already running them goes on."""
    if not attempts:
        return {}
    rows = JobRun.objects.filter(pk__in={job_id for job_id, _ in attempts}).values_list(
        "pk", "attempt", "status", "agent", "stop_requested_at", "cleanup_deadline",
        "build__status", "build__cancel_forced_at",
    )  # fmt: skip
    keep, soft = set(), set()
    for job_id, attempt, status, on, stopped, cleaning, build_status, forced in rows:
        ours = status == RunStatus.RUNNING and on == agent and stopped is None
        cancelling = build_status == BuildStatus.CANCELLING
        if (
            status == RunStatus.QUEUED
            or (ours and not cancelling)
            or (ours and cancelling and forced is None and cleaning is not None)
        ):
            keep.add((job_id, attempt))  # its own, or running its cleanup
        elif ours and cancelling and forced is None:
            soft.add((job_id, attempt))  # the cancel's stop: its cleanup steps run next
    return {attempt: attempt not in soft for attempt in attempts - keep}
