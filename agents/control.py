"""Stopping running jobs on this agent. The controller broadcasts `stop_job` (a Celery
remote-control command, handled by the worker's consumer thread, so it is heard while every
pool thread is busy running steps); the job's runner sees the flag within a tick and ends
the step's process group. Keyed by attempt: a stop for another attempt stops nothing."""

import threading
from collections import Counter
from contextlib import contextmanager

from celery.worker import state as worker_state
from celery.worker.control import control_command

_running: dict[tuple[int, int], threading.Event] = {}
_holders: Counter[tuple[int, int]] = Counter()
_lock = threading.Lock()


@contextmanager
def tracking(job_id: int, attempt: int):
    """Register a job attempt running here; yields the event that asks it to stop. A
    duplicate delivery of an attempt already running here shares its event and never
    unregisters it, so a stop still reaches the run that is real."""
    key = (job_id, attempt)
    with _lock:
        stop = _running.setdefault(key, threading.Event())
        _holders[key] += 1
    try:
        yield stop
    finally:
        with _lock:
            _holders[key] -= 1
            if not _holders[key]:
                del _holders[key], _running[key]


def running_attempts() -> set[tuple[int, int]]:
    """The (job, attempt) pairs running here now."""
    with _lock:
        return set(_running)


def request_stop(job_id: int, attempt: int) -> bool:
    with _lock:
        stop = _running.get((job_id, attempt))
    if stop is not None:
        stop.set()
    return stop is not None


@control_command(args=[("job_id", int), ("attempt", int)], signature="<job_id> <attempt>")
def stop_job(state, job_id, attempt):
    return {"ok": request_stop(job_id, attempt)}


@control_command(args=[("task_ids", list)], signature="<task_id> [task_id ...]")
def revoke_jobs(state, task_ids):
    """Celery's own `revoke` asks the result backend about every id, on every worker: two
    queries per job per worker, in the consumer thread. A cancelled job's message needs only
    to be dropped when it arrives, which the worker's revoked set does (and the job's
    compare-and-set fences it anyway, e.g. after a restart that forgot the set)."""
    worker_state.revoked.update(task_ids)
    return {"ok": len(task_ids)}


@control_command()
def sync_consumers(state):
    """The server changed something about this agent (a lease released): re-read it."""
    from agents import worker

    threading.Thread(target=worker.sync_consumers, daemon=True).start()
    return {"ok": True}
