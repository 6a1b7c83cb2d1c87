from celery import shared_task

from builds import services


@shared_task(ignore_result=False)
def advance_build(build_id: int) -> str | None:
    return services.advance_build(build_id)


@shared_task(ignore_result=True)
def reconcile_running_builds() -> list[int]:
    return services.reconcile_running_builds()
