from celery import shared_task

from agents import leases, services
from agents.executor import execute_job
from agents.worker import current_agent


@shared_task(ignore_result=False)
def run_job(job_id: int, attempt: int) -> str | None:
    return execute_job(job_id, attempt, current_agent())


@shared_task(ignore_result=True)
def mark_lost_agents() -> list[str]:
    return services.mark_lost_agents()


@shared_task(ignore_result=True)
def sweep_leases() -> dict[str, list]:
    return leases.sweep()
