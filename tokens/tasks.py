from celery import shared_task

from tokens import retention


@shared_task(ignore_result=True)
def purge_tokens() -> int:
    return retention.purge()
