"""The remote-control commands an agent answers (names in ciproject.protocol). Celery runs
them in the worker's consumer thread, so they are heard while every pool thread is busy
running steps; each only calls into the AgentProcess that installed itself here. They are
registered on import, in every worker that imports the tasks (the controller too, which has
no agent: there they do nothing). A stop is keyed by attempt: a stop for another attempt
stops nothing."""

from celery.worker import state as worker_state
from celery.worker.control import control_command

from ciproject import protocol

_agent = None  # the AgentProcess of this worker, if it is an agent


def install(agent) -> None:
    """The commands act on this AgentProcess from now on (the process calls this at start:
    it imports this module, never the other way round)."""
    global _agent
    _agent = agent


@control_command(
    name=protocol.STOP_JOB,
    args=[("job_id", int), ("attempt", int), ("force", bool)],
    signature="<job_id> <attempt> [force]",
)
def stop_job(state, job_id, attempt, force=True):
    """The job's runner sees the flag within a tick and ends the step's processes (then,
    unless forced, runs the job's cleanup steps)."""
    return {"ok": _agent is not None and _agent.request_stop(job_id, attempt, force)}


@control_command(
    name=protocol.REVOKE_JOBS, args=[("task_ids", list)], signature="<task_id> [task_id ...]"
)
def revoke_jobs(state, task_ids):
    """Celery's own `revoke` asks the result backend about every id, on every worker: two
    queries per job per worker, in the consumer thread. A cancelled job's message needs only
    to be dropped when it arrives, which the worker's revoked set does (and the job's
    compare-and-set fences it anyway, e.g. after a restart that forgot the set)."""
    worker_state.revoked.update(task_ids)
    return {"ok": len(task_ids)}


@control_command(name=protocol.SYNC_CONSUMERS)
def sync_consumers(state):
    """The server changed something about this agent (a lease released): re-read it."""
    if _agent is not None:
        _agent.request_sync()
    return {"ok": True}
