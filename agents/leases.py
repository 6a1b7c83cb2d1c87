"""Agent leases: a build whose later jobs say `reuse: JOB` holds the agent that ran JOB, so
those jobs run there, in the same workspace, and no other build places a job on it
meanwhile. PostgreSQL is the arbiter: AgentLease has one row per agent at most, so two
placements racing on one agent cannot both hold it.

- The job that others reuse takes the lease when it starts on an agent (start_job).
- A reusing job is sent to that agent's own queue once the build holds the lease; if another
  build holds it, the job waits (LeaseWait, first come first served) with a clear reason,
  for LEASE_WAIT_TIMEOUT_SECONDS at most.
- The lease is released when no job of the build needs the agent any more, and whenever the
  build ends, however it ends; a sweep releases (and reports) any lease whose build ended.
- A leased agent leaves the shared queues (and hands back, in start_job, any other build's
  job it had already received). So that builds which each hold an agent never wait on each
  other for jobs left in the shared queues, the build's other queued jobs that the agent
  can run are sent to it too (pull_jobs; not those bound to another agent): the first
  agent to start one wins, the other message is fenced off by the job's compare-and-set.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from agents.models import Agent, AgentLease, AgentStatus, LeaseWait
from builds.statuses import BUILD_FINAL, RunStatus
from ciproject.celery import app, publish

log = logging.getLogger(__name__)

SYNC_COMMAND = "sync_consumers"  # agents.control.sync_consumers
NEEDING = (RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING)


def holder(agent_name: str) -> int | None:
    """The build holding the agent's lease, if any."""
    return (
        AgentLease.objects.filter(agent__name=agent_name).values_list("build_id", flat=True).first()
    )


def lock_agent(agent_name: str) -> Agent | None:
    """Lock the agent's row: every decision about its lease is taken holding it, so a
    placement, a start and a release of one agent never interleave."""
    return Agent.objects.select_for_update().filter(name=agent_name).first()


def acquire(agent_name: str, build_id: int) -> bool:
    """Take the agent's lease for the build, or find the build already holds it. False if
    another build holds it. Call inside the transaction that places the job, the agent's
    row locked."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO agents_agentlease (agent_id, build_id, acquired_at)"
            " SELECT id, %s, now() FROM agents_agent WHERE name = %s"
            " ON CONFLICT (agent_id) DO NOTHING",
            [build_id, agent_name],
        )
    return holder(agent_name) == build_id


def pull_jobs(agent_name: str, build_id: int) -> None:
    """Also send the build's queued jobs this agent can run (by label) to its own queue: not
    those bound to an agent (reusing jobs, retried lease-taking jobs), which run only there."""
    from builds.models import JobRun
    from builds.services.lifecycle import publish_to_agent

    labels = Agent.objects.filter(name=agent_name).values_list("labels", flat=True).first()
    queued = JobRun.objects.filter(
        build_id=build_id, status=RunStatus.QUEUED, reuse_of="", runs_on__in=labels or []
    ).exclude(Q(takes_lease=True) & ~Q(agent=""))
    for job in queued:
        publish_to_agent(job, agent_name)


def place_on_agent(job, publish) -> None:
    """Send a job bound to one agent there: a job with `reuse:` to the agent of the job it
    reuses, a retried lease-taking job back to its own. The build holds (or takes) that
    agent's lease; else the job waits, or fails at once if the agent is gone."""
    from builds.models import JobRun

    if job.reuse_of:
        target = JobRun.objects.filter(build_id=job.build_id, key=job.reuse_of).first()
        name = target.agent if target else ""
    else:
        name = job.agent
    agent = lock_agent(name) if name else None
    if agent is None or agent.status == AgentStatus.OFFLINE:
        owner = job.reuse_of or job.key
        _fail(job, f"the agent that ran {owner!r}, {name or '(none)'}, is gone; the job needs it")
        return
    if acquire(agent.name, job.build_id):
        publish(agent.name)
        return
    LeaseWait.objects.update_or_create(
        job=job, defaults={"agent": agent, "build_id": job.build_id, "since": timezone.now()}
    )
    held_by = holder(agent.name)
    JobRun.objects.filter(pk=job.pk).update(
        reason=f"waiting for agent {agent.name}, leased to build {held_by}"
    )


def release_if_done(build) -> None:
    """Release the build's leases that no job of it still needs (all of them if it ended)."""
    from builds.models import JobRun

    if build.status in BUILD_FINAL:
        LeaseWait.objects.filter(build=build).delete()
    for lease in AgentLease.objects.filter(build=build).select_related("agent"):
        needed = (
            build.status not in BUILD_FINAL
            and JobRun.objects.filter(build=build, status__in=NEEDING)
            .filter(Q(takes_lease=True) | ~Q(reuse_of=""))
            .exists()
        )
        if not needed:
            release(lease)


def release(lease: AgentLease) -> None:
    """Free the agent: the next waiting build gets it; the agent drops the released
    build's kept workspaces."""
    agent = lock_agent(lease.agent.name)
    lease.delete()
    log.info("agent %s: lease of build %s released", agent.name, lease.build_id)
    _grant_next(agent)
    transaction.on_commit(lambda: _tell(agent))


def _grant_next(agent: Agent) -> None:
    from builds.services.lifecycle import publish_to_agent

    waiting = LeaseWait.objects.filter(agent=agent)
    # A wait whose job no longer waits (its build ended, it was retried) is dropped.
    waiting.exclude(job__status=RunStatus.QUEUED).delete()
    first = waiting.first()
    if first is None or not acquire(agent.name, first.build_id):
        return
    waits = LeaseWait.objects.filter(agent=agent, build_id=first.build_id)
    jobs = [wait.job for wait in waits.select_related("job")]
    waits.delete()
    for job in jobs:
        publish_to_agent(job, agent.name)


def agent_lost(agent_name: str, reason: str) -> None:
    """The agent is gone: the jobs bound to it (waiting for it, or sent to its own queue)
    fail now rather than wait, and its lease goes."""
    from builds.models import JobRun

    with transaction.atomic():
        lock_agent(agent_name)
        targets = JobRun.objects.filter(
            build_id=OuterRef("build_id"), key=OuterRef("reuse_of"), agent=agent_name
        )
        bound = JobRun.objects.filter(status=RunStatus.QUEUED).filter(
            Q(takes_lease=True, agent=agent_name) | (~Q(reuse_of="") & Exists(targets))
        )
        for job in bound:
            _fail(job, f"{reason}; this job must run on it")
        LeaseWait.objects.filter(agent__name=agent_name).delete()
        AgentLease.objects.filter(agent__name=agent_name).delete()


def sweep() -> dict[str, list]:
    """Beat: release leases whose build has ended (each one is a bug signal: the normal path
    should have), and fail jobs that waited too long for a leased agent."""
    from builds.statuses import BUILD_FINAL as FINAL

    leaked = []
    for lease in AgentLease.objects.filter(build__status__in=FINAL).select_related("agent"):
        with transaction.atomic():
            log.warning(
                "lease sweep: agent %s was still leased to ended build %s; released",
                lease.agent.name,
                lease.build_id,
            )
            release(lease)
            leaked.append(lease.agent.name)
    cutoff = timezone.now() - timedelta(seconds=settings.LEASE_WAIT_TIMEOUT_SECONDS)
    timed_out = []
    for wait in LeaseWait.objects.filter(since__lt=cutoff).select_related("job", "agent"):
        with transaction.atomic():
            _fail(
                wait.job,
                f"waited {settings.LEASE_WAIT_TIMEOUT_SECONDS} s for agent {wait.agent.name},"
                " leased to another build",
            )
            wait.delete()
            timed_out.append(wait.job_id)
    return {"leaked": leaked, "timed_out": timed_out}


def _fail(job, reason: str) -> None:
    from builds.models import JobRun, StepRun
    from builds.services.lifecycle import advance_build

    updated = JobRun.objects.filter(pk=job.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.FAILED, reason=reason, finished_at=timezone.now()
    )
    LeaseWait.objects.filter(job_id=job.pk).delete()
    if updated:
        StepRun.objects.filter(job_id=job.pk, status=RunStatus.PENDING).update(
            status=RunStatus.SKIPPED
        )
        build_id = job.build_id
        transaction.on_commit(lambda: advance_build(build_id))


def _tell(agent: Agent) -> None:
    """Ask the agent to re-read its state (its kept workspaces); its heartbeat re-reads it
    anyway."""
    publish(app.control.broadcast, SYNC_COMMAND, destination=[f"{agent.name}@{agent.hostname}"])
