"""The agent process: a Celery worker that registers itself, heartbeats, and marks itself
offline when it stops. `manage.py runagent` starts it."""

import ctypes
import logging
import socket
import threading

from celery.signals import worker_ready
from django.conf import settings
from django.db import close_old_connections, connection

from agents import services
from agents.models import AgentStatus
from ciproject.celery import agent_queue, app, job_queue, retry_queue

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
_agent_name: str | None = None


def current_agent() -> str:
    if _agent_name is None:
        raise RuntimeError("this worker is not an agent: start it with `manage.py runagent`")
    return _agent_name


# Set while an operator has disabled (drained) this agent: it finishes what it runs and takes
# no new job from the shared queues.
draining = threading.Event()


def _heartbeat_loop(register, name: str, pool_queues: list[str], stop: threading.Event) -> None:
    nodename = f"{name}@{socket.gethostname()}"
    while not stop.wait(settings.AGENT_HEARTBEAT_SECONDS):
        try:
            close_old_connections()
            status = services.heartbeat(name)
            if status is None:
                register()  # the row was removed under us: put it back
            _follow_drain(status == AgentStatus.DISABLED, nodename, pool_queues)
        except Exception:  # the database may be restarting: the next beat tries again
            log.warning("agent %s: heartbeat failed", name, exc_info=True)
    connection.close()


def _follow_drain(disabled: bool, nodename: str, pool_queues: list[str]) -> None:
    """Stop (or resume) consuming the shared queues when the agent is disabled (enabled)."""
    if disabled == draining.is_set():
        return
    command = app.control.cancel_consumer if disabled else app.control.add_consumer
    for queue in pool_queues:
        command(queue, destination=[nodename])
    if disabled:
        draining.set()
        log.info("agent %s: disabled, taking no new jobs", nodename)
    else:
        draining.clear()
        log.info("agent %s: enabled again", nodename)


def _hide_environment() -> None:
    """Make this process non-dumpable, so a step running as another (or the same, non-root)
    user cannot read the agent's environment (database URL, keys) from /proc/PID/environ."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        log.warning("agent: could not make the process non-dumpable")


def run_agent(name: str, labels: list[str], capacity: int, loglevel: str = "INFO") -> None:
    global _agent_name
    _agent_name = name
    _hide_environment()
    from ciproject import __version__

    def register(starting=False):
        services.register_agent(
            name, socket.gethostname(), labels, capacity, __version__, starting=starting
        )

    register(starting=True)
    stop = threading.Event()
    pool_queues = [retry_queue(label) for label in labels] + [job_queue(label) for label in labels]
    queues = [agent_queue(name), *pool_queues]

    @worker_ready.connect(weak=False)
    def start_heartbeats(**kwargs):  # once the worker hears control commands (drain)
        beat = threading.Thread(
            target=_heartbeat_loop, args=(register, name, pool_queues, stop), daemon=True
        )
        beat.start()

    log.info("agent %s consumes %s", name, ", ".join(queues))
    try:
        app.worker_main(
            [
                "worker",
                f"--hostname={name}@%h",
                f"--queues={','.join(queues)}",
                "--pool=threads",
                f"--concurrency={capacity}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        stop.set()
        close_old_connections()
        services.mark_offline(name)
