from celery import shared_task

from builds import partitions, services
from ciproject.celery import ERRORS_ONLY
from ciproject.log_format import log_context
from dispatch import placement


@shared_task(**ERRORS_ONLY)
def advance_build(build_id: int) -> str | None:
    return services.advance_build(build_id)  # its log lines carry the build id


@shared_task(**ERRORS_ONLY)
def finish_cancel(build_id: int) -> str | None:
    with log_context(build_id=build_id):
        return services.finish_cancel(build_id)


@shared_task(ignore_result=True)
def cancel_watchdog() -> list[int]:
    return services.cancel_watchdog()


@shared_task(ignore_result=True)
def sweep_queues() -> dict[str, list[int]]:
    return services.sweep_queues()


@shared_task(ignore_result=True)
def reconcile_running_builds() -> dict[str, list[int]]:
    """Re-drive what lost messages left waiting: builds to advance, jobs to send again."""
    return {
        "advanced": services.reconcile_running_builds(),
        "resent": placement.resend_lost_jobs(),
    }


@shared_task(ignore_result=True)
def ensure_partitions() -> list[str]:
    return partitions.ensure()


@shared_task(ignore_result=True)
def purge_partitions() -> list[str]:
    return partitions.purge(by="beat").dropped
