"""Every message the server publishes. Each function sends once the caller's transaction
commits (at once outside one), and a broker that cannot take a message is logged, never
raised: the sweeps re-drive from PostgreSQL what it would have done (ciproject.celery.publish)."""

from django.db import transaction

from agents.models import Agent
from ciproject import protocol
from ciproject.celery import app, publish


def send_jobs(queued: list[tuple[int, int, str]]) -> None:
    """Jobs (id, attempt, runs-on) to their label's queue; retried ones to its retry queue."""

    def send():
        for job_id, attempt, runs_on in queued:
            queue = protocol.retry_queue(runs_on) if attempt > 1 else protocol.job_queue(runs_on)
            if not _send_job(job_id, attempt, queue):
                return  # the broker is down: the resend sweep sends the rest too

    if queued:
        transaction.on_commit(send)


def send_to_agent(job_id: int, attempt: int, agent: str) -> None:
    """A job to one agent's own queue (agent reuse)."""
    transaction.on_commit(lambda: _send_job(job_id, attempt, protocol.agent_queue(agent)))


def _send_job(job_id: int, attempt: int, queue: str) -> bool:
    return publish(
        app.send_task,
        protocol.RUN_JOB,
        args=(job_id, attempt),
        queue=queue,
        task_id=protocol.job_task_id(job_id, attempt),
    )


def advance_build(build_id: int) -> None:
    """Ask the controller to move the build on (a job of it ended)."""
    _to_controller(protocol.ADVANCE_BUILD, build_id)


def finish_cancel(build_id: int) -> None:
    """Ask the controller for the batched part of a cancel. Without retries: a cancel
    answers at once, and the watchdog (beat) finishes it when the broker is down."""
    _to_controller(protocol.FINISH_CANCEL, build_id, retry=False)


def seal_secrets(job_id: int, attempt: int) -> None:
    """An agent asks the controller for its job attempt's secrets, sealed to it."""
    publish(
        app.send_task, protocol.SEAL_SECRETS, args=(job_id, attempt),
        queue=protocol.CONTROLLER_QUEUE,
    )  # fmt: skip


def _to_controller(task: str, build_id: int, **options) -> None:
    queue = protocol.CONTROLLER_QUEUE
    transaction.on_commit(
        lambda: publish(app.send_task, task, args=(build_id,), queue=queue, **options)
    )


def revoke_jobs(jobs: list[tuple[int, int]]) -> None:
    """Every agent drops these job attempts' messages when they arrive."""
    task_ids = [protocol.job_task_id(job_id, attempt) for job_id, attempt in jobs]
    if task_ids:
        transaction.on_commit(
            lambda: publish(
                app.control.broadcast, protocol.REVOKE_JOBS, arguments={"task_ids": task_ids}
            )
        )


def stop_job(job_id: int, attempt: int, agent: str, force: bool = True) -> None:
    """Tell the agent running this job attempt to stop it (SIGTERM, grace, SIGKILL); unless
    `force`d, it runs the job's cleanup steps then (a cancel's stop). An agent whose host is
    not known yet is reached by a broadcast: the attempt is the key."""
    hostname = Agent.objects.filter(name=agent).values_list("hostname", flat=True).first()
    destination = [protocol.node_name(agent, hostname)] if hostname else None
    transaction.on_commit(
        lambda: publish(
            app.control.broadcast,
            protocol.STOP_JOB,
            arguments={"job_id": job_id, "attempt": attempt, "force": force},
            destination=destination,
        )
    )


def sync_agent(agent: Agent) -> None:
    """Ask the agent to re-read what the server says of it (a lease released); its heartbeat
    re-reads it anyway."""
    destination = [protocol.node_name(agent.name, agent.hostname)]
    transaction.on_commit(
        lambda: publish(app.control.broadcast, protocol.SYNC_CONSUMERS, destination=destination)
    )
