from celery import shared_task

from ciproject.log_format import log_context
from vault import services


@shared_task(ignore_result=True)
def seal_secrets(job_id: int, attempt: int) -> bool:
    with log_context(job_id=job_id, attempt=attempt):
        return services.seal_for_job(job_id, attempt)
