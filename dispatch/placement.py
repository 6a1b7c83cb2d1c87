"""Where queued jobs go: a job bound to one agent (dispatch.leases) to that agent's own
queue, any other to its label's queue, which the agents with that label consume; a job whose
message was lost is sent again."""

from collections import Counter
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from agents.models import Agent, AgentStatus
from builds.models import JobRun
from builds.statuses import RunStatus
from dispatch import leases, messages


def place(jobs: list[JobRun], explain_waits: bool = True) -> list[tuple[JobRun, str]]:
    """Send queued jobs on their way once the caller's transaction commits. A job whose label
    no online agent has waits QUEUED, saying so (unless `explain_waits` is off: a job handed
    back keeps its reason). Returns the jobs that cannot be placed (the agent they are bound
    to is gone), with why: the caller fails them."""
    unplaceable, free = [], []
    for job in jobs:
        if job.bound:
            reason = leases.place_on_agent(job)
            if reason:
                unplaceable.append((job, reason))
        elif keeper := _keeper_for(job):
            messages.send_to_agent(job.pk, job.attempt, keeper)
        else:
            free.append(job)
    if explain_waits:
        _explain_waits(free)
    messages.send_jobs([(job.pk, job.attempt, job.runs_on) for job in free])
    return unplaceable


def _keeper_for(job: JobRun) -> str | None:
    """The agent keeping the job's workspace since it failed there (a step retry goes on in
    it), if that agent may take the job now: online, with the job's label, not leased to
    another build. Else the job goes to its label's queue, and runs from its first step."""
    name = job.kept_workspace_on
    if not name:
        return None
    keeper = Agent.objects.filter(
        name=name, status=AgentStatus.ONLINE, labels__contains=[job.runs_on]
    )
    if keeper.exists() and leases.holder(name) in (None, job.build_id):
        return name
    return None


# One statement for all the jobs placed: the check is the UPDATE's own, so the usual case (an
# agent has the label) costs no round trip more. (Labels are plain words: %L quotes as repr.)
_EXPLAIN_WAITS = (
    "UPDATE builds_jobrun j"
    " SET reason = format('waiting: no online agent has the label %%L', j.runs_on)"
    " WHERE j.id = ANY(%s) AND NOT EXISTS (SELECT FROM agents_agent a"
    "  WHERE a.status = %s AND a.labels @> jsonb_build_array(j.runs_on))"
)


def _explain_waits(jobs: list[JobRun]) -> None:
    """A job whose label no online agent has waits QUEUED, saying so (until an agent comes,
    or JOB_WAIT_TIMEOUT_SECONDS pass)."""
    if jobs:
        with connection.cursor() as cursor:
            cursor.execute(_EXPLAIN_WAITS, [[job.pk for job in jobs], AgentStatus.ONLINE])


def online_agents_with_label(label: str) -> bool:
    return Agent.objects.filter(status=AgentStatus.ONLINE, labels__contains=[label]).exists()


def idle_agents() -> dict[str, tuple[list[str], int | None]]:
    """Online agents with a free slot now: name -> (labels, the build it is leased to)."""
    busy = Counter(JobRun.objects.filter(status=RunStatus.RUNNING).values_list("agent", flat=True))
    online = Agent.objects.filter(status=AgentStatus.ONLINE)
    return {
        name: (labels, leased_to)
        for name, labels, capacity, leased_to in online.values_list(
            "name", "labels", "capacity", "lease__build_id"
        )
        if busy[name] < capacity
    }


def resend_lost_jobs(now=None) -> list[int]:
    """Send again the jobs that waited JOB_RESEND_AFTER_SECONDS while an agent that may run
    them sat idle: their message was lost. A duplicate is harmless (the job's compare-and-set
    lets one start), and a job is resent at most once per that time."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.JOB_RESEND_AFTER_SECONDS)
    waiting = JobRun.objects.filter(status=RunStatus.QUEUED, queued_at__lt=cutoff).filter(
        Q(resent_at=None) | Q(resent_at__lt=cutoff)
    )
    idle = idle_agents()
    if not idle or not waiting.exists():
        return []
    resent, to_label_queues = [], []
    with transaction.atomic():
        for job in waiting.select_for_update(no_key=True, skip_locked=True):
            agent = _idle_agent_for(job, idle)
            if agent is None:
                continue
            if job.bound:
                messages.send_to_agent(job.pk, job.attempt, agent)
            else:
                to_label_queues.append((job.pk, job.attempt, job.runs_on))
            resent.append(job.pk)
        JobRun.objects.filter(pk__in=resent).update(resent_at=now)
        messages.send_jobs(to_label_queues)
    return resent


def _idle_agent_for(job: JobRun, idle: dict) -> str | None:
    """An idle agent that may run the job now: its own agent if it is bound to one, else one
    with its label that is not leased to another build."""
    bound = job.bound_agent()
    for name, (labels, leased_to) in idle.items():
        mine = leased_to in (None, job.build_id)
        if mine and (name == bound if bound is not None else job.runs_on in labels):
            return name
    return None
