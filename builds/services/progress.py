"""A build on the move: after a job ends, queue the jobs whose wait is over (builds.dag),
skip those whose condition says so, finish the build, and start the queued builds its
concurrency group has room for."""

import logging

from django.db import connection, transaction
from django.utils import timezone

from builds import dag
from builds.errors import BuildVariablesMissing
from builds.models import Build, JobRun, StepRun
from builds.services.execution import build_variables, cleanup_deadline
from builds.statuses import (
    BUILD_FINAL,
    RUN_FINAL,
    BuildStatus,
    RunStatus,
    build_allowed_from,
)
from ciproject import metrics
from ciproject.log_format import log_context
from ciproject.transactions import retried_on_conflict
from concurrency import services as concurrency
from dispatch import leases, messages, placement

log = logging.getLogger(__name__)


@retried_on_conflict
def advance_build(build_id: int) -> str | None:
    """Move a build on after a job ended: queue what may start now, or finish the build (a
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


def advance_locked(build: Build, made: list[JobRun] | None = None) -> str:
    """advance_build's decision, on a locked build; then the agent leases it no longer needs
    are released. `made`: the jobs of a build made in this transaction (a trigger's), which
    are its runs as they stand, and no agent is leased to it yet: that spares their reads."""
    status = _decide(build, made)
    build.status = status if status in BUILD_FINAL else build.status
    if made is None:
        leases.release_if_done(build)
    return status


def _decide(build: Build, made: list[JobRun] | None = None) -> str:
    cancelling = build.status == BuildStatus.CANCELLING
    if cancelling and not _cleans_up(build):
        cancel_waiting_jobs(build.pk)
        return _cancelled_when_idle(build)
    if made is None:
        runs = runs_of(build.pk)
    else:
        runs = [_run(*(getattr(job, name) for name in RUN_FIELDS)) for job in made]
    plan = dag.plan(runs, _matrix_rules(build.spec), lambda: _variables(build), cancelling)
    if plan.cancel:
        _cancel_runs(build.pk, plan.cancel)
    for reason, keys in _by_reason(plan.skip).items():
        _skip_runs(build.pk, keys, reason)
    if plan.start:
        queue_jobs(build.pk, plan.start, leased=made is None)
    if cancelling:
        _give_cleanup_time(build.pk, plan.start + plan.clean)
        return _cancelled_when_idle(build)
    if plan.outcome is None:
        return BuildStatus.RUNNING
    outcome = BuildStatus.SUCCEEDED if plan.outcome == RunStatus.SUCCEEDED else BuildStatus.FAILED
    finish_build(build, outcome)
    return outcome


def _cleans_up(build: Build) -> bool:
    """Whether jobs may still start for a CANCELLING build (those whose condition holds after
    a cancel): not once the cancel is forced, nor for a build its queue held (no slot)."""
    return build.cancel_forced_at is None and build.cancelled_from == BuildStatus.RUNNING


def _cancelled_when_idle(build: Build) -> str:
    if JobRun.objects.filter(build_id=build.pk).exclude(status__in=RUN_FINAL).exists():
        return BuildStatus.CANCELLING
    finish_build(build, BuildStatus.CANCELED)
    return BuildStatus.CANCELED


def _give_cleanup_time(build_id: int, keys: list[str]) -> None:
    """The jobs that run after their build's cancel have until their cleanup_deadline (by the
    database's clock, as the cancel watchdog's), which also lets them start (start_job)."""
    if keys:
        JobRun.objects.filter(
            build_id=build_id, key__in=keys, status=RunStatus.QUEUED, cleanup_deadline=None
        ).update(cleanup_deadline=cleanup_deadline())


RUN_FIELDS = ("key", "matrix_of", "stage_index", "status", "needs", "condition", "matrix")


def runs_of(build_id: int) -> list[dag.Run]:
    """The build's jobs as builds.dag sees them."""
    rows = JobRun.objects.filter(build_id=build_id).values_list(*RUN_FIELDS)
    return [_run(*row) for row in rows]


def _run(key, matrix_of, stage, status, needs, condition, matrix) -> dag.Run:
    return dag.Run(key, matrix_of or key, stage, status, _tuple(needs), condition, matrix or {})


def _tuple(needs: list[str] | None) -> tuple[str, ...] | None:
    return None if needs is None else tuple(needs)


def _matrix_rules(spec: dict) -> dict[str, dag.MatrixRule]:
    return {
        job["id"]: dag.MatrixRule(job["matrix"]["max_parallel"], job["matrix"]["fail_fast"])
        for stage in spec["stages"]
        for job in stage["jobs"]
        if job.get("matrix")
    }


def _variables(build: Build) -> dict[str, str]:
    """The build's variables as they are now, for its jobs' conditions."""
    try:
        return build_variables(build)
    except BuildVariablesMissing as exc:
        raise dag.VariablesUnavailable(exc.detail) from None


def _by_reason(runs: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for key, reason in runs.items():
        grouped.setdefault(reason, []).append(key)
    return grouped


def _skip_runs(build_id: int, keys: list[str], reason: str) -> None:
    """PENDING -> SKIPPED for these jobs and their steps (the build's row is locked: nothing
    else moves a PENDING job)."""
    JobRun.objects.filter(build_id=build_id, key__in=keys, status=RunStatus.PENDING).update(
        status=RunStatus.SKIPPED, reason=reason, finished_at=timezone.now()
    )
    StepRun.objects.filter(
        job__build_id=build_id, job__key__in=keys, status=RunStatus.PENDING
    ).update(status=RunStatus.SKIPPED)


def _cancel_runs(build_id: int, runs: dict[str, str]) -> None:
    """Fail-fast (a matrix's other runs) or a cancel (what may not run after it): these runs
    end CANCELED; those on an agent are stopped there (finish_job records them CANCELED
    with this reason)."""
    for reason, keys in _by_reason(runs).items():
        cancel_waiting_jobs(build_id, reason, keys)
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE builds_jobrun SET stop_requested_at = %s, reason = %s"
                " WHERE build_id = %s AND key = ANY(%s) AND status = %s"
                " AND stop_requested_at IS NULL RETURNING id, attempt, agent",
                [timezone.now(), reason, build_id, keys, RunStatus.RUNNING],
            )
            for job_id, attempt, agent in cursor.fetchall():
                messages.stop_job(job_id, attempt, agent)


def cancel_waiting_jobs(build_id: int, reason: str = "", keys: list[str] | None = None) -> int:
    """PENDING or QUEUED -> CANCELED for the build's jobs (those of `keys`), with their steps,
    in one compare-and-set (a job an agent starts meanwhile is not among them); their
    messages are revoked. A running job's steps are its agent's to end. Returns how many."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE builds_jobrun SET status = %s, finished_at = %s,"
            " reason = CASE WHEN %s = '' THEN reason ELSE %s END"
            " WHERE build_id = %s AND status = ANY(%s) AND (%s::text[] IS NULL OR key = ANY(%s))"
            " RETURNING id, attempt",
            [RunStatus.CANCELED, timezone.now(), reason, reason, build_id,
             [RunStatus.PENDING, RunStatus.QUEUED], keys, keys],
        )  # fmt: skip
        cancelled = cursor.fetchall()
    StepRun.objects.filter(
        job_id__in=[job_id for job_id, _ in cancelled],
        status__in=(RunStatus.PENDING, RunStatus.QUEUED),
    ).update(status=RunStatus.CANCELED)
    messages.revoke_jobs(cancelled)
    return len(cancelled)


def queue_jobs(build_id: int, keys: list[str], leased: bool = True) -> None:
    """PENDING -> QUEUED for these jobs, placed on agents once the transaction commits; the
    build's leased agents (unless it has none: `leased` off) may run them too."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE builds_jobrun SET status = %s, queued_at = %s"
            " WHERE build_id = %s AND key = ANY(%s) AND status = %s"
            " RETURNING id, attempt, key, runs_on, reuse_of, takes_lease, agent, kept_workspace_on",
            [RunStatus.QUEUED, timezone.now(), build_id, keys, RunStatus.PENDING],
        )
        columns = [column.name for column in cursor.description]
        jobs = [JobRun(build_id=build_id, **dict(zip(columns, row, strict=True))) for row in cursor]
    _place(jobs)
    if leased:
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
