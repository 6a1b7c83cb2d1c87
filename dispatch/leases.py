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
from django.utils import timezone

from agents.models import Agent, AgentLease, AgentStatus, LeaseWait
from builds.models import Build, JobRun
from builds.statuses import BUILD_FINAL, RunStatus
from dispatch import messages

log = logging.getLogger(__name__)

NEEDING = (RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING)


def holder(agent_name: str) -> int | None:
    """The build holding the agent's lease, if any."""
    return (
        AgentLease.objects.filter(agent__name=agent_name).values_list("build_id", flat=True).first()
    )


def lock_for_start(agent_name: str) -> tuple[int | None, list[str]]:
    """lock_agent for a job's start, in one round trip: the build holding the agent's lease,
    if any, and the agent's labels (none for an agent not registered)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT l.build_id, a.labels FROM agents_agent a"
            " LEFT JOIN agents_agentlease l ON l.agent_id = a.id"
            " WHERE a.name = %s FOR NO KEY UPDATE OF a",
            [agent_name],
        )
        row = cursor.fetchone()
    return (row[0], row[1] or []) if row else (None, [])


def lock_agent(agent_name: str) -> Agent | None:
    """Lock the agent's row: every decision about its lease is taken holding it, so a
    placement, a start and a release of one agent never interleave."""
    return Agent.objects.select_for_update(no_key=True).filter(name=agent_name).first()


def acquire(agent_name: str, build_id: int) -> bool:
    """Take the agent's lease for the build, or find the build already holds it. False if
    another build holds it. Call inside the transaction that places the job, the agent's
    row locked."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO agents_agentlease (agent_id, build_id, acquired_at)"
            " SELECT id, %s, now() FROM agents_agent WHERE name = %s"
            " ON CONFLICT (agent_id) DO NOTHING RETURNING build_id",
            [build_id, agent_name],
        )
        if cursor.fetchone():  # taken now
            return True
    return holder(agent_name) == build_id


def pull_jobs(agent_name: str, build_id: int, labels: list[str] | None = None) -> None:
    """Also send the build's queued jobs this agent can run (by label, read unless given) to
    its own queue: not those bound to an agent, which run only there."""
    if labels is None:
        labels = Agent.objects.filter(name=agent_name).values_list("labels", flat=True).first()
    queued = JobRun.objects.unbound().filter(
        build_id=build_id, status=RunStatus.QUEUED, runs_on__in=labels or []
    )
    for job_id, attempt in queued.values_list("id", "attempt"):
        messages.send_to_agent(job_id, attempt, agent_name)


def pull_to_leased_agents(build_id: int) -> None:
    """The build's leased agents may run its queued jobs too."""
    leased = AgentLease.objects.filter(build_id=build_id)
    for agent, labels in leased.values_list("agent__name", "agent__labels"):
        pull_jobs(agent, build_id, labels)


def place_on_agent(job: JobRun) -> str | None:
    """Send a bound job to its agent: a job with `reuse:` to the agent of the job it reuses,
    a retried lease-taking job back to its own. The build holds (or takes) that agent's
    lease; else the job waits. Returns why it cannot be placed (the agent is gone), else
    None."""
    name = job.bound_agent()
    agent = lock_agent(name) if name else None
    if agent is None or agent.status == AgentStatus.OFFLINE:
        owner = job.reuse_of or job.key
        return f"the agent that ran {owner!r}, {name or '(none)'}, is gone; the job needs it"
    if acquire(agent.name, job.build_id):
        messages.send_to_agent(job.pk, job.attempt, agent.name)
        return None
    LeaseWait.objects.update_or_create(
        job=job, defaults={"agent": agent, "build_id": job.build_id, "since": timezone.now()}
    )
    held_by = holder(agent.name)
    JobRun.objects.filter(pk=job.pk).update(
        reason=f"waiting for agent {agent.name}, leased to build {held_by}"
    )
    return None


def forget_wait(job_id: int) -> None:
    LeaseWait.objects.filter(job_id=job_id).delete()


def release_if_done(build: Build) -> None:
    """Release the build's leases that no job of it still needs (all of them if it ended)."""
    if build.status in BUILD_FINAL:
        LeaseWait.objects.filter(build=build).delete()
    for lease in AgentLease.objects.filter(build=build).select_related("agent"):
        needed = (
            build.status not in BUILD_FINAL
            and JobRun.objects.using_lease().filter(build=build, status__in=NEEDING).exists()
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
    messages.sync_agent(agent)


def _grant_next(agent: Agent) -> None:
    waiting = LeaseWait.objects.filter(agent=agent)
    # A wait whose job no longer waits (its build ended, it was retried) is dropped.
    waiting.exclude(job__status=RunStatus.QUEUED).delete()
    first = waiting.first()
    if first is None or not acquire(agent.name, first.build_id):
        return
    waits = LeaseWait.objects.filter(agent=agent, build_id=first.build_id)
    jobs = [(wait.job_id, wait.job.attempt) for wait in waits.select_related("job")]
    waits.delete()
    for job_id, attempt in jobs:
        messages.send_to_agent(job_id, attempt, agent.name)


def drop_agent(agent_name: str) -> None:
    """The agent is gone: its lease and the waits for it go (inside the caller's
    transaction, the agent locked, its bound jobs failed)."""
    LeaseWait.objects.filter(agent__name=agent_name).delete()
    AgentLease.objects.filter(agent__name=agent_name).delete()


def release_leaked() -> list[str]:
    """Release leases whose build has ended, each in its transaction, and log each one: a
    bug signal, the normal path should have. Returns the agents freed."""
    leaked = []
    for lease in AgentLease.objects.filter(build__status__in=BUILD_FINAL).select_related("agent"):
        with transaction.atomic():
            log.warning(
                "lease sweep: agent %s was still leased to ended build %s; released",
                lease.agent.name,
                lease.build_id,
            )
            release(lease)
            leaked.append(lease.agent.name)
    return leaked


def expired_waits() -> list[LeaseWait]:
    """Waits for a leased agent older than LEASE_WAIT_TIMEOUT_SECONDS."""
    cutoff = timezone.now() - timedelta(seconds=settings.LEASE_WAIT_TIMEOUT_SECONDS)
    return list(LeaseWait.objects.filter(since__lt=cutoff).select_related("job", "agent"))
