"""What a lost agent costs its builds: the jobs it was running end FAILED with a reason
naming it (or run again elsewhere, where the running step's retry rule says `agent-lost`),
the jobs bound to it fail rather than wait, its lease goes, the builds move on. The agent
registry (agents.services) decides when an agent is lost."""

from django.db import transaction
from django.db.models import OuterRef, Subquery

from agents.models import AgentLease, LeaseWait
from builds.models import Build, JobRun, StepRun
from builds.services.execution import finish_job, run_jobs_again
from builds.services.logs import add_late_note
from builds.services.progress import advance_after_commit, fail_queued_job
from builds.statuses import BuildStatus, RunStatus
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


def agents_left_with_work(names) -> set[str]:
    """Of these agents (their names), those on which something is still
    recorded that fail_jobs_of_lost_agent cleans up: a running job, a lease, a wait for one,
    or a queued job only it may run. In five queries, however many agents: an agent gone for
    good costs the sweep nothing."""
    if not names:
        return set()
    running = JobRun.objects.filter(agent__in=names, status=RunStatus.RUNNING)
    reused = JobRun.objects.filter(build_id=OuterRef("build_id"), key=OuterRef("reuse_of"))
    reusing = (
        JobRun.objects.filter(status=RunStatus.QUEUED)
        .exclude(reuse_of="")
        .annotate(bound=Subquery(reused.values("agent")[:1]))
        .filter(bound__in=names)
    )
    leasing = JobRun.objects.filter(status=RunStatus.QUEUED, takes_lease=True, agent__in=names)
    leased = AgentLease.objects.filter(agent__name__in=names)
    waited = LeaseWait.objects.filter(agent__name__in=names)
    return (
        set(running.values_list("agent", flat=True))
        | set(reusing.values_list("bound", flat=True))
        | set(leasing.values_list("agent", flat=True))
        | set(leased.values_list("agent__name", flat=True))
        | set(waited.values_list("agent__name", flat=True))
    )


def fail_jobs_on_agent(agent: str, reason: str) -> list[int]:
    """The jobs recorded as RUNNING on a lost agent end FAILED (CANCELED if their build is
    being cancelled) with `reason`, or run again elsewhere (run_again_elsewhere); their
    builds move on. The agent, if it still runs them somewhere, is told to stop: its late
    results are fenced off by the job's status and attempt."""
    failed = []
    for job in JobRun.objects.filter(agent=agent, status=RunStatus.RUNNING):
        cut_short = list(job.steps.filter(status=RunStatus.RUNNING).values_list("id", "attempt"))
        if run_again_elsewhere(job, reason):
            add_late_note(cut_short, f"{reason}; the job runs again on another agent")
        elif finish_job(job, RunStatus.FAILED, reason):
            add_late_note(cut_short, reason)  # after anything the agent may still have written
            failed.append(job.pk)
        else:
            continue
        messages.stop_job(job.pk, job.attempt, agent)
    return failed


def run_again_elsewhere(job: JobRun, reason: str) -> bool:
    """An `agent-lost` retry: the step the lost agent was running opted in and has a retry
    left, so the job runs again from its first step (its workspace went with the agent), as
    attempt + 1, on any agent with its label. Not a job whose workspace is the build's lease
    (bound to that agent), nor one of a build that no longer runs."""
    step = job.steps.filter(status=RunStatus.RUNNING).first()
    rule = (step.retry_rule or {}) if step else {}
    if job.uses_lease or "agent-lost" not in rule.get("on", ()) or step.attempt > step.max_retries:
        return False
    with transaction.atomic():
        running = Build.objects.filter(pk=job.build_id, status=BuildStatus.RUNNING)
        if not running.select_for_update(no_key=True).exists():
            return False
        again = JobRun.objects.filter(pk=job.pk, attempt=job.attempt, status=RunStatus.RUNNING)
        if not again.select_for_update(no_key=True).exists():  # ended meanwhile
            return False
        run_jobs_again(
            StepRun.objects.filter(job=job),
            again,
            agent="",
            reason=f"{reason}; running again on another agent (retry: on agent-lost)",
        )
        advance_after_commit(job.build_id)
    return True
