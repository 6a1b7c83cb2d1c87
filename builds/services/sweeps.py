"""Beat's sweeps over builds: what a lost message, a killed process or a wait past its
limit left behind is re-driven or ended from what PostgreSQL holds."""

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from builds.models import Build, JobRun
from builds.services.progress import (
    advance_after_commit,
    advance_build,
    fail_queued_job,
    finish_build,
    start_queued_builds,
)
from builds.statuses import BuildStatus, RunStatus
from concurrency import services as concurrency
from dispatch import leases, placement


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


def sweep_queues() -> dict[str, list[int]]:
    """End queued builds that waited past their policy's queue_timeout (QUEUE_TIMEOUT), start
    queued builds whose group has room (a start lost with its process), and fail jobs no
    agent could take."""
    timed_out = []
    for build_id, timeout in concurrency.expired_queued_builds():
        with transaction.atomic():
            build = Build.objects.select_for_update(no_key=True).get(pk=build_id)
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
    one agent is handled with that agent: sweep_leases and lost_agents.)"""
    wait = settings.JOB_WAIT_TIMEOUT_SECONDS
    cutoff = (now or timezone.now()) - timedelta(seconds=wait)
    failed = []
    stale = JobRun.objects.unbound().filter(status=RunStatus.QUEUED, queued_at__lt=cutoff)
    for job_id, build_id, runs_on in stale.values_list("id", "build_id", "runs_on"):
        if placement.online_agents_with_label(runs_on):
            continue
        reason = f"no agent with the label {runs_on!r} took this job within {wait} s"
        if fail_queued_job(job_id, reason):
            advance_build(build_id)
            failed.append(job_id)
    return failed


def sweep_leases() -> dict[str, list]:
    """Release leases whose build has ended (each one is a bug signal: the normal path should
    have), and fail jobs that waited too long for a leased agent."""
    leaked = leases.release_leaked()
    timed_out = []
    for wait in leases.expired_waits():
        with transaction.atomic():
            reason = (
                f"waited {settings.LEASE_WAIT_TIMEOUT_SECONDS} s for agent {wait.agent.name},"
                " leased to another build"
            )
            if fail_queued_job(wait.job_id, reason):
                advance_after_commit(wait.job.build_id)
            timed_out.append(wait.job_id)
    return {"leaked": leaked, "timed_out": timed_out}
