"""A build's life on the server: trigger, advance stage by stage, finish."""

import hashlib
import json
import logging
import re
from contextlib import suppress
from datetime import timedelta
from itertools import groupby

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from agents import leases
from agents.models import AgentLease
from builds.definition import normalize_variables
from builds.errors import (
    BuildAlreadyFinished,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    VariablePartitionMissing,
)
from builds.models import Build, BuildVariable, JobRun, Pipeline, StepRun
from builds.statuses import (
    BUILD_FINAL,
    RUN_FAILED,
    RUN_FINAL,
    BuildStatus,
    RunStatus,
    build_allowed_from,
)
from ciproject import metrics
from ciproject.celery import agent_queue, app, job_queue, publish, retry_queue
from ciproject.log_format import log_context
from concurrency import services as concurrency
from concurrency.models import ConcurrencyPolicy

log = logging.getLogger(__name__)

NO_PARTITION_FOR_ROW = "23514"  # check_violation: "no partition of relation ... for row"


IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, as a UUID is


def trigger_build(pipeline: Pipeline, variables=None, user=None, idempotency_key="") -> Build:
    """Create build N+1 of `pipeline` with its variables and status tree, admit it by the
    pipeline's concurrency policy, and queue its first stage if it may run. Bad variables
    raise InvalidVariables, a full queue PipelineQueueFull, before anything is stored.

    With an `idempotency_key`, the same trigger again (a client retrying after a lost
    answer, a form sent twice) returns the build the first one made, with `replayed` set;
    the key with other variables raises IdempotencyKeyReused."""
    overrides = normalize_variables({} if variables is None else variables)
    if idempotency_key and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise InvalidIdempotencyKey(
            "an idempotency key is 1 to 200 printable ASCII characters, without spaces"
            " (a UUID, say)"
        )
    try:
        return _trigger(pipeline, overrides, user, idempotency_key)
    except IntegrityError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != NO_PARTITION_FOR_ROW:
            raise
        raise VariablePartitionMissing(
            "no partition of the variable table holds builds created now; nothing was stored."
            " Run `manage.py partitions ensure` (beat runs it every hour)"
        ) from None


def _trigger(pipeline: Pipeline, overrides: dict[str, str], user, key: str) -> Build:
    fingerprint = _fingerprint(overrides) if key else ""
    with transaction.atomic():
        if key and (earlier := _earlier_trigger(pipeline.pk, key, fingerprint)):
            return earlier
        number, spec, policy_id = _next_build_number(pipeline.pk)
        now = timezone.now()
        build = Build(
            pipeline=pipeline,
            number=number,
            status=BuildStatus.RUNNING,
            spec=spec,
            triggered_by=user if user and user.is_authenticated else None,
            created_at=now,
            idempotency_key=key,
            idempotency_fingerprint=fingerprint,
        )
        if policy_id is not None:
            _admit(build, policy_id, {**spec["variables"], **overrides})
        if build.status == BuildStatus.RUNNING:
            build.started_at = now
        else:
            build.enqueued_at = now
        build.save(force_insert=True)
        with log_context(build_id=build.pk):
            _store_variables(build, spec["variables"], "pipeline", skip=overrides)
            _store_variables(build, overrides, "trigger")
            _create_tree(build, spec)
            if build.status == BuildStatus.RUNNING:
                _queue_stage(build.pk, 0)
    return build


def _fingerprint(overrides: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()


def _earlier_trigger(pipeline_id: int, key: str, fingerprint: str) -> Build | None:
    """The build an earlier trigger with this key made. The pipeline's row is locked first,
    as the trigger's numbering does, so a concurrent trigger with the key waits for this one."""
    Pipeline.objects.select_for_update().filter(pk=pipeline_id).values_list("pk").first()
    build = Build.objects.filter(pipeline_id=pipeline_id, idempotency_key=key).first()
    if build is None:
        return None
    if build.idempotency_fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            f"build #{build.number} was triggered with this idempotency key and other"
            " variables; nothing was done. Use a new key for a new build",
            build=build.pk,
            number=build.number,
        )
    build.replayed = True
    return build


def _next_build_number(pipeline_id: int) -> tuple[int, dict, int | None]:
    # The UPDATE row-locks the pipeline until commit, so concurrent triggers are serialized
    # here, and the spec and policy are read in the same statement.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE builds_pipeline SET last_build_number = last_build_number + 1"
            " WHERE id = %s RETURNING last_build_number, spec, policy_id",
            [pipeline_id],
        )
        number, spec, policy_id = cursor.fetchone()
    return number, json.loads(spec) if isinstance(spec, str) else spec, policy_id


def _admit(build: Build, policy_id: int, variables: dict[str, str]) -> None:
    from builds.services.cancellation import cancel_at_once, request_cancel

    policy = ConcurrencyPolicy.objects.get(pk=policy_id)
    build.policy = policy
    build.concurrency_group = concurrency.group_key(policy, build.pipeline, variables)
    concurrency.lock_group(build.concurrency_group)
    if policy.cancel_in_progress:
        group = Build.objects.filter(concurrency_group=build.concurrency_group)
        for other in group.filter(status=BuildStatus.QUEUED):
            cancel_at_once(other, f"cancelled by build #{build.number} (cancel in progress)")
        for other_id in group.filter(status=BuildStatus.RUNNING).values_list("id", flat=True):
            with suppress(BuildAlreadyFinished):  # it ended meanwhile: nothing to cancel
                request_cancel(other_id)  # the real path: its steps are stopped on the agents

    def evict(oldest: Build) -> None:
        cancel_at_once(
            oldest,
            f"evicted from the full queue of group {build.concurrency_group!r}"
            f" by build #{build.number} of {build.pipeline.name!r}",
        )

    build.status = concurrency.admit(build, policy, on_evict=evict)


def start_queued_builds(group: str) -> list[int]:
    """Start the queued builds of `group` that its policy now has room for, oldest first (a
    build put back by a step retry before them). One transaction, the group locked."""
    with transaction.atomic():
        started = []
        for build_id in concurrency.builds_to_start(group):
            build = Build.objects.select_for_update().get(pk=build_id)
            updated = Build.objects.filter(
                pk=build_id, status__in=build_allowed_from(BuildStatus.RUNNING)
            ).update(status=BuildStatus.RUNNING, started_at=build.started_at or timezone.now())
            if updated:
                build.status = BuildStatus.RUNNING
                with log_context(build_id=build_id):
                    advance_locked(build)
                started.append(build_id)
    return started


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
    reuse = {j["id"]: j.get("reuse") for stage in spec["stages"] for j in stage["jobs"]}

    def root(key: str) -> str:  # `c` reuses `b` which reuses `a`: all run on a's agent
        while reuse.get(key):
            key = reuse[key]
        return key

    leased = {root(key) for key, target in reuse.items() if target}
    for stage_index, stage in enumerate(spec["stages"]):
        for job_spec in stage["jobs"]:
            key = job_spec["id"]
            job = JobRun(
                build=build,
                stage_index=stage_index,
                stage_name=stage["name"],
                key=key,
                runs_on=job_spec["runs_on"],
                reuse_of=root(key) if reuse.get(key) else "",
                takes_lease=key in leased,
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
            " WHERE build_id = %s AND stage_index = %s AND status = %s"
            " RETURNING id, attempt, runs_on, reuse_of <> '' OR (takes_lease AND agent <> '')",
            [RunStatus.QUEUED, timezone.now(), build_id, stage_index, RunStatus.PENDING],
        )
        rows = cursor.fetchall()
    # Jobs bound to one agent (reuse, or a retried job whose workspace is on its agent) go
    # to that agent's queue; the others to their label's.
    queued = [(job_id, attempt, runs_on) for job_id, attempt, runs_on, bound in rows if not bound]
    for job in JobRun.objects.filter(pk__in=[job_id for job_id, *_, bound in rows if bound]):
        leases.place_on_agent(job, lambda agent, job=job: publish_to_agent(job, agent))
    _explain_waits(queued)
    transaction.on_commit(lambda: publish_jobs(queued))
    for agent in AgentLease.objects.filter(build_id=build_id).values_list("agent__name", flat=True):
        leases.pull_jobs(agent, build_id)  # the build's leased agents may run them too


def publish_to_agent(job: JobRun, agent: str) -> None:
    """Once committed, send the job to one agent's own queue (agent reuse)."""
    job_id, attempt = job.pk, job.attempt
    transaction.on_commit(
        lambda: publish(
            app.send_task,
            "agents.tasks.run_job",
            args=(job_id, attempt),
            queue=agent_queue(agent),
            task_id=f"job-{job_id}-{attempt}",
        )
    )


def _explain_waits(queued) -> None:
    """A job whose label no online agent has waits QUEUED, saying so (until an agent comes,
    or JOB_WAIT_TIMEOUT_SECONDS pass)."""
    from agents.services import online_agents_with_label

    for label in {runs_on for _, _, runs_on in queued}:
        if not online_agents_with_label(label):
            ids = [job_id for job_id, _, runs_on in queued if runs_on == label]
            JobRun.objects.filter(pk__in=ids).update(
                reason=f"waiting: no online agent has the label {label!r}"
            )


def requeue_job(job_id: int, attempt: int) -> None:
    """Send a QUEUED job again (an agent handed it back: drained, or leased elsewhere)."""
    job = JobRun.objects.filter(pk=job_id, attempt=attempt, status=RunStatus.QUEUED).first()
    if job is None:
        return
    with transaction.atomic():
        if job.reuse_of or (job.takes_lease and job.agent):
            leases.place_on_agent(job, lambda agent: publish_to_agent(job, agent))
        else:
            transaction.on_commit(lambda: publish_jobs([(job.pk, job.attempt, job.runs_on)]))


def publish_jobs(queued) -> None:
    for job_id, attempt, runs_on in queued:
        sent = publish(
            app.send_task,
            "agents.tasks.run_job",
            args=(job_id, attempt),
            queue=retry_queue(runs_on) if attempt > 1 else job_queue(runs_on),
            task_id=f"job-{job_id}-{attempt}",
        )
        if not sent:  # the broker is down: the resend sweep sends the rest too
            return


def advance_build(build_id: int) -> str | None:
    """Move a build on after a job ended: queue the next stage, or finish the build (a
    CANCELLING one as CANCELED once nothing of it runs any more). Idempotent: the build row
    is locked and everything is re-read."""
    with log_context(build_id=build_id), transaction.atomic():
        build = Build.objects.select_for_update().filter(pk=build_id).first()
        if build is None or build.status not in (BuildStatus.RUNNING, BuildStatus.CANCELLING):
            return None
        return advance_locked(build)


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
            _queue_stage(build.pk, stage_index)
        return BuildStatus.RUNNING
    finish_build(build, BuildStatus.SUCCEEDED)
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


def sweep_queues() -> dict[str, list[int]]:
    """Beat: end queued builds that waited past their policy's queue_timeout (QUEUE_TIMEOUT),
    and start queued builds whose group has room (a start lost with its process)."""
    timed_out = []
    for build_id, timeout in concurrency.expired_queued_builds():
        with transaction.atomic():
            build = Build.objects.select_for_update().get(pk=build_id)
            reason = f"waited in the queue longer than the policy's queue_timeout ({timeout} s)"
            if finish_build(build, BuildStatus.QUEUE_TIMEOUT, reason):
                timed_out.append(build_id)
    groups = (
        Build.objects.filter(status=BuildStatus.QUEUED)
        .order_by()
        .values_list("concurrency_group", flat=True)
        .distinct()
    )
    started = [build_id for group in groups for build_id in start_queued_builds(group)]
    return {"timed_out": timed_out, "started": started, "jobs_failed": fail_unplaced_jobs()}


def fail_unplaced_jobs(now=None) -> list[int]:
    """Jobs that waited JOB_WAIT_TIMEOUT_SECONDS while no agent with their label is online
    end FAILED, saying why. (A job behind a backlog of busy agents waits on; a job bound to
    one agent is handled with that agent: agents.leases.)"""
    from agents.services import online_agents_with_label

    wait = settings.JOB_WAIT_TIMEOUT_SECONDS
    cutoff = (now or timezone.now()) - timedelta(seconds=wait)
    failed = []
    stale = JobRun.objects.filter(status=RunStatus.QUEUED, queued_at__lt=cutoff, reuse_of="")
    stale = stale.exclude(takes_lease=True, agent__gt="")
    for job_id, build_id, runs_on in stale.values_list("id", "build_id", "runs_on"):
        if online_agents_with_label(runs_on):
            continue
        updated = JobRun.objects.filter(pk=job_id, status=RunStatus.QUEUED).update(
            status=RunStatus.FAILED,
            finished_at=timezone.now(),
            reason=f"no agent with the label {runs_on!r} took this job within {wait} s",
        )
        if updated:
            StepRun.objects.filter(job_id=job_id, status=RunStatus.PENDING).update(
                status=RunStatus.SKIPPED
            )
            advance_build(build_id)
            failed.append(job_id)
    return failed
