from celery import shared_task

from audit import retention


@shared_task(ignore_result=True)
def purge_events() -> int:
    return retention.purge()
