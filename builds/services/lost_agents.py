"""What a lost agent costs its builds: the jobs it was running end FAILED with a reason
naming it, the jobs bound to it fail rather than wait, its lease goes, the builds move on.
The agent registry (agents.services) decides when an agent is lost."""

from django.db import transaction

from builds.models import JobRun
from builds.services.execution import finish_job
from builds.services.logs import add_late_note
from builds.services.progress import advance_after_commit, fail_queued_job
from builds.statuses import RunStatus
from dispatch import leases, messages


def fail_jobs_of_lost_agent(name: str, why: str) -> list[int]:
    """Returns the running jobs that were failed."""
    reason = f"agent {name} was lost: it {why}"
    failed = fail_jobs_on_agent(name, reason)
    with transaction.atomic():
        leases.lock_agent(name)
        for job in JobRun.objects.bound_to(name).filter(status=RunStatus.QUEUED):
            if fail_queued_job(job.pk, f"{reason}; this job must run on it"):
                advance_after_commit(job.build_id)
        leases.drop_agent(name)
    return failed


def fail_jobs_on_agent(agent: str, reason: str) -> list[int]:
    """The jobs recorded as RUNNING on a lost agent end FAILED (CANCELED if their build is
    being cancelled) with `reason`; their builds move on. The agent, if it still runs them
    somewhere, is told to stop: its late results are fenced off by the job's status."""
    failed = []
    for job in JobRun.objects.filter(agent=agent, status=RunStatus.RUNNING):
        cut_short = list(job.steps.filter(status=RunStatus.RUNNING).values_list("id", "attempt"))
        if not finish_job(job, RunStatus.FAILED, reason):
            continue
        add_late_note(cut_short, reason)  # after anything the agent may still have written
        messages.stop_job(job.pk, job.attempt, agent)
        failed.append(job.pk)
    return failed
