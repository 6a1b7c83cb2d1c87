"""Recovering from lost messages. PostgreSQL holds every status, so a message the broker lost
(a restart, a flush) shows as work that waits while nothing could be holding it up."""

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from builds.models import JobRun
from builds.services.lifecycle import publish_jobs, publish_to_agent
from builds.statuses import RunStatus


def resend_lost_jobs(now=None) -> list[int]:
    """Send again the jobs that waited JOB_RESEND_AFTER_SECONDS while an agent that may run
    them sat idle: their message was lost. A duplicate is harmless (the job's compare-and-set
    lets one start), and a job is resent at most once per that time."""
    from agents.services import idle_agents

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
        for job in waiting.select_for_update(skip_locked=True):
            agent = _idle_agent_for(job, idle)
            if agent is None:
                continue
            if job.reuse_of or (job.takes_lease and job.agent):
                publish_to_agent(job, agent)
            else:
                to_label_queues.append((job.pk, job.attempt, job.runs_on))
            resent.append(job.pk)
        JobRun.objects.filter(pk__in=resent).update(resent_at=now)
        transaction.on_commit(lambda: publish_jobs(to_label_queues))
    return resent


def _idle_agent_for(job: JobRun, idle: dict) -> str | None:
    """An idle agent that may run the job now: its own agent if it is bound to one, else one
    with its label that is not leased to another build."""
    if job.reuse_of:
        target = JobRun.objects.filter(build_id=job.build_id, key=job.reuse_of)
        bound = target.values_list("agent", flat=True).first()
    else:
        bound = job.agent if job.takes_lease and job.agent else None
    for name, (labels, leased_to) in idle.items():
        mine = leased_to in (None, job.build_id)
        if mine and (name == bound if bound is not None else job.runs_on in labels):
            return name
    return None
