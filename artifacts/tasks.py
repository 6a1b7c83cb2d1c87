from celery import shared_task

from artifacts import services


@shared_task(ignore_result=True)
def expire_artifacts() -> dict[str, int]:
    freed = services.expire()
    return {"files": freed.files, "bytes": freed.bytes}
