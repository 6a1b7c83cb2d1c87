from celery import shared_task

from agents import services
from agents.process import agent
from builds import services as builds
from ciproject.celery import ERRORS_ONLY


@shared_task(**ERRORS_ONLY)
def run_job(job_id: int, attempt: int) -> str | None:
    """On an agent (ciproject.protocol.RUN_JOB)."""
    return agent.current().run_job(job_id, attempt)


@shared_task(ignore_result=True)
def mark_lost_agents() -> list[str]:
    return services.mark_lost_agents()


@shared_task(ignore_result=True)
def sweep_leases() -> dict[str, list]:
    return builds.sweep_leases()
