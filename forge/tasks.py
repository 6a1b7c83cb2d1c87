from celery import shared_task

from forge.services import schedules, statuses


@shared_task(ignore_result=True)
def deliver_status(status_id: int) -> bool:
    return statuses.deliver(status_id)


@shared_task(ignore_result=True)
def deliver_statuses() -> int:
    return statuses.deliver_due()


@shared_task(ignore_result=True)
def fire_schedules() -> int:
    return schedules.fire_due()
