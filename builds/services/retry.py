"""Retries, which run part of a build again as the same build, with new attempt numbers.

Build retry: a finished build runs again, attempt + 1, while its variables are still kept
(can_retry, the one rule the API, the admin and the CLI ask), through its concurrency policy
like a new build. Step retry: a failed step runs again in place, then the rest of its job and
of the build. A step retry is part of its build, never a new one: on a running build it
starts at once (no admission, no queue-length check, no new slot); on a finished build it
takes the build back to RUNNING if its group has a free slot, else to the head of the
group's queue. It is never refused for a full queue and never evicts anyone.

Every job that runs again gets a new attempt, hence a new message id: the old one may sit
in a worker's revoked set, and a late message of the old attempt is fenced off."""

from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

import audit
from builds import dag, partitions
from builds.errors import (
    BuildNotFound,
    BuildNotRetryable,
    RetryWindowExpired,
    StepNotFound,
    StepNotRetryable,
)
from builds.models import Build, BuildVariable, JobRun, StepRun
from builds.services.cancellation import cancel_at_once
from builds.services.execution import run_jobs_again
from builds.services.progress import advance_locked, runs_of
from builds.statuses import (
    BUILD_FINAL,
    BUILD_RETRY_TRANSITIONS,
    RETRYABLE_RUNS,
    RUN_FINAL,
    RUN_RETRY_TRANSITIONS,
    BuildStatus,
    RunStatus,
)
from ciproject import metrics
from ciproject.errors import CIError
from ciproject.transactions import retried_on_conflict
from concurrency import services as concurrency
from concurrency.models import ConcurrencyPolicy


@retried_on_conflict
def retry_step(build_id: int, step_id: int) -> StepRun:
    """Run a failed step again, then the rest of its job and of the build. Of a finished
    build, only within the retry window (can_retry, as for a build retry)."""
    step = StepRun.objects.select_related("job__build").filter(pk=step_id).first()
    if step is None or step.job.build_id != build_id:
        raise StepNotFound(f"build {build_id} has no step {step_id}")
    group = step.job.build.concurrency_group
    with transaction.atomic():
        if group:
            concurrency.lock_group(group)  # the group before the build, as everywhere
        build = Build.objects.select_for_update(no_key=True).get(pk=build_id)
        job = JobRun.objects.select_for_update(no_key=True).get(pk=step.job_id)
        step = StepRun.objects.select_for_update(no_key=True).get(pk=step_id)
        check_step_retryable(build, job, step)
        if build.status in BUILD_FINAL:  # it runs again: only while its variables are kept
            _refuse_unless(can_retry(build, include_succeeded=True))
        _reset_job_from(job, step)
        _reset_dependents(build, job)
        if build.status in BUILD_FINAL:
            _take_back(build)
        if build.status == BuildStatus.RUNNING:
            advance_locked(build)  # queues the job again, on its retry queue
        audit.record("step.retry", step, build=build_id)
        transaction.on_commit(metrics.STEP_RETRIES.inc)
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
    """The step and the steps after it run again; the steps before it keep their results."""
    updated = run_jobs_again(
        StepRun.objects.filter(job=job, index__gte=step.index),
        JobRun.objects.filter(
            pk=job.pk, status__in=RUN_RETRY_TRANSITIONS[RunStatus.QUEUED] | {RunStatus.SUCCEEDED}
        ),
        # A job whose agent is leased to the build keeps it: the retry continues its job
        # there, in its workspace.
        agent=Case(When(takes_lease=True, then=F("agent")), default=Value("")),
    )
    assert updated, "the job was locked and checked final"


def _reset_dependents(build: Build, job: JobRun) -> None:
    """What was skipped or cancelled after the retried job (what waits for it) runs again,
    and the runs of its matrix that its failure cancelled (fail-fast)."""
    not_run = RUN_RETRY_TRANSITIONS[RunStatus.PENDING] - {RunStatus.FAILED, RunStatus.TIMED_OUT}
    keys = dag.dependents(runs_of(build.pk), [job.key])
    jobs = JobRun.objects.filter(build=build, status__in=not_run).filter(
        Q(key__in=keys)
        | Q(matrix_of=job.matrix_of, reason__startswith=dag.FAIL_FAST) & ~Q(matrix_of="")
    )
    run_jobs_again(StepRun.objects.filter(job__in=jobs, status__in=not_run), jobs)


def _take_back(build: Build) -> None:
    """A finished build runs again if its group has room, else waits at the queue's head."""
    status = BuildStatus.RUNNING
    if build.concurrency_group:
        running = Build.objects.filter(
            concurrency.occupying(), concurrency_group=build.concurrency_group
        ).count()
        if build.policy is not None and running >= build.policy.max_running:
            status = BuildStatus.QUEUED
    now = timezone.now()
    running = status == BuildStatus.RUNNING
    Build.objects.filter(pk=build.pk, status__in=BUILD_RETRY_TRANSITIONS[status]).update(
        status=status,
        # A build cancelled while it queued never started: running now, it holds a slot, and
        # occupying() counts a CANCELLING build by its start.
        started_at=(build.started_at or now) if running else build.started_at,
        finished_at=None,
        reason="",
        cancel_requested_at=None,
        cancel_forced_at=None,
        cancel_requested_by=None,
        enqueued_at=now if status == BuildStatus.QUEUED else build.enqueued_at,
        queue_priority=1 if status == BuildStatus.QUEUED else 0,
    )
    build.status = status


# Build retry ---------------------------------------------------------------------------

RETRYABLE_BUILDS = frozenset({BuildStatus.FAILED, BuildStatus.CANCELED, BuildStatus.QUEUE_TIMEOUT})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    refusal: type[CIError] | None = None  # the error a refused retry raises
    reason: str = ""
    fields: dict = field(default_factory=dict)

    @property
    def code(self) -> str:
        return self.refusal.code if self.refusal else ""


def can_retry(build: Build, include_succeeded: bool = False) -> Decision:
    """May `build` be retried now, and if not, why. The one rule the API, the admin and the
    CLI all ask. The window comes from the partition catalog: a build is retryable while the
    partition holding its variables exists and will not be purged within the safety margin."""
    retryable = RETRYABLE_BUILDS | ({BuildStatus.SUCCEEDED} if include_succeeded else set())
    if build.status not in retryable:
        hint = " (retry a SUCCEEDED build with all jobs)" if build.status == "SUCCEEDED" else ""
        return Decision(
            False,
            BuildNotRetryable,
            f"Build #{build.number} of {build.pipeline.name!r} is {build.status}; only a"
            f" FAILED, CANCELED or QUEUE_TIMEOUT build can be retried{hint}.",
            {"status": build.status},
        )
    earliest = partitions.earliest_retryable()
    kept = earliest is not None and build.created_at >= earliest
    if kept and partitions.partition_exists_for(build.created_at):
        return Decision(True)
    days = settings.VARIABLE_RETENTION_DAYS
    since = (
        f"only builds created on or after {earliest:%Y-%m-%d} can be retried"
        if earliest
        else "no build can be retried until the variable partitions are recreated"
    )
    return Decision(
        False,
        RetryWindowExpired,
        f"Build #{build.number} of {build.pipeline.name!r} was created on"
        f" {build.created_at:%Y-%m-%d}; {since}, because build variables are kept for"
        f" {days} days.",
        {
            "created_at": build.created_at.isoformat(),
            "earliest_retryable": earliest.isoformat() if earliest else None,
            "retention_days": days,
        },
    )


@retried_on_conflict
def retry_build(build_id: int, failed_only: bool = True, user=None) -> Build:
    """Re-run a finished build as the same build with attempt + 1, its variables restored
    from the variable table: with failed_only, its failed and cancelled jobs and everything
    after them; else every job. It goes through its concurrency policy like a new build."""
    build = Build.objects.select_related("pipeline").filter(pk=build_id).first()
    if build is None:
        raise BuildNotFound(f"there is no build with id {build_id}")
    _refuse_unless(can_retry(build, include_succeeded=not failed_only))
    with transaction.atomic():
        if build.concurrency_group:
            concurrency.lock_group(build.concurrency_group)
        build = (
            Build.objects.select_for_update(no_key=True, of=("self",))
            .select_related("pipeline")
            .get(pk=build_id)
        )
        _refuse_unless(can_retry(build, include_succeeded=not failed_only))  # it may have changed
        _reset_for_retry(build, failed_only)
        status = BuildStatus.RUNNING
        if build.policy_id:
            status = _admit_retry(build)
        now = timezone.now()
        Build.objects.filter(pk=build.pk, status__in=BUILD_RETRY_TRANSITIONS[status]).update(
            status=status,
            attempt=F("attempt") + 1,
            started_at=now if status == BuildStatus.RUNNING else None,
            enqueued_at=now if status == BuildStatus.QUEUED else None,
            finished_at=None,
            reason="",
            queue_priority=0,
            cancel_requested_at=None,
            cancel_forced_at=None,
            cancel_requested_by=None,
        )
        build.refresh_from_db()
        audit.record("build.retry", build, failed_only=failed_only, attempt=build.attempt)
        if status == BuildStatus.RUNNING:
            advance_locked(build)
    return build


def _refuse_unless(decision: Decision) -> None:
    if not decision.allowed:
        metrics.BUILD_RETRIES_REFUSED.labels(decision.code).inc()
        raise decision.refusal(decision.reason, **decision.fields)


def _reset_for_retry(build: Build, failed_only: bool) -> None:
    jobs = JobRun.objects.filter(build=build)
    if failed_only:
        jobs = jobs.filter(pk__in=_failed_and_after(build, list(jobs)))
    else:
        # A full retry starts from the variables the build was triggered with.
        by_steps = BuildVariable.objects.filter(
            build_created_at=build.created_at, build=build, source="step"
        )
        by_steps.filter(triggered_value=None).delete()
        by_steps.update(
            value=F("triggered_value"),
            source=F("triggered_source"),
            triggered_value=None,
            triggered_source="",
        )
    run_jobs_again(StepRun.objects.filter(job__in=jobs), jobs, agent="")


def _failed_and_after(build: Build, jobs: list[JobRun]) -> set[int]:
    """What a failed-only retry runs again: the jobs that failed or were cancelled (or never
    ran), everything that waits for them (what they skipped), and the jobs these reuse
    (their workspace went with the build's lease), with what waits for those. A job its own
    condition skipped stays skipped."""
    again = {job.key for job in jobs if job.status in RETRYABLE_RUNS | {RunStatus.PENDING}}
    if not again:
        raise BuildNotRetryable(f"build #{build.number} has no failed job to retry")
    by_key, runs = {job.key: job for job in jobs}, runs_of(build.pk)
    while True:
        again |= dag.dependents(runs, again)
        reused = {by_key[key].reuse_of for key in again} - {""} - again
        if not reused:
            return {by_key[key].pk for key in again}
        again |= reused


def _admit_retry(build: Build) -> str:
    def evict(oldest: Build) -> None:
        cancel_at_once(
            oldest,
            f"evicted from the full queue of group {build.concurrency_group!r}"
            f" by the retry of build #{build.number} of {build.pipeline.name!r}",
        )

    # Its group was locked before the build (retry_build): read its limits as they are now.
    policy = ConcurrencyPolicy.objects.get(pk=build.policy_id)
    return concurrency.admit(build, policy, on_evict=evict)
