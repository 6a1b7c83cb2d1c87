"""What a worker process (an agent, the controller) keeps of each task it ran stays bounded
by a small number, not by Celery's defaults (see ciproject.celery)."""

from celery.worker import state as worker_state

from ciproject.celery import SUCCESSFUL_IDS_KEPT


class Ended:
    """A task request as Celery's task_ready sees one once the task has succeeded."""

    def __init__(self, task_id: str):
        self.id = task_id


def test_a_worker_keeps_only_its_last_successful_task_ids():
    kept = worker_state.successful_requests
    kept.clear()
    try:
        for n in range(1000):
            worker_state.task_ready(Ended(f"job-{n}-1"), successful=True)
        assert len(kept) <= SUCCESSFUL_IDS_KEPT
        assert "job-999-1" in kept  # the newest stay, for the checks that need them
    finally:
        kept.clear()
