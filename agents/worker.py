"""The agent process: a Celery worker that registers itself, heartbeats, follows what the
server says of it (disabled by an operator, leased to a build), and marks itself offline
when it stops. `manage.py runagent` starts it."""

import ctypes
import logging
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from celery.signals import worker_ready
from django.conf import settings
from django.db import close_old_connections, connection

from agents import leases, orphans, services
from agents import metrics as agent_metrics
from agents.models import AgentStatus
from ciproject.celery import agent_queue, app, job_queue, retry_queue

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
SHUTDOWN_JOIN_SECONDS = 30  # a beat blocked on the database does not hold the exit for ever


@dataclass
class Identity:
    name: str
    nodename: str
    pool_queues: list[str]
    consuming: bool = True  # the shared (label and retry) queues
    # Workspaces kept for the build leasing this agent: removed once the lease is gone.
    kept: dict[int, set[Path]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_me: Identity | None = None
# Set while an operator has disabled (drained) this agent: it finishes what it runs and
# takes no new job from the shared queues.
draining = threading.Event()


def current_agent() -> str:
    if _me is None:
        raise RuntimeError("this worker is not an agent: start it with `manage.py runagent`")
    return _me.name


def keep_workspace(build_id: int, path: Path) -> None:
    with _me.lock:
        _me.kept.setdefault(build_id, set()).add(path)


def sync_consumers() -> None:
    """Consume the shared queues unless disabled or leased to a build (a leased agent gets
    its build's jobs on its own queue: see agents.leases); drop workspaces of ended leases.
    The wanted state is asserted again on every heartbeat: a control message may be lost."""
    if _me is None:
        return
    close_old_connections()
    with _me.lock:
        status = services.status_of(_me.name)
        holder = leases.holder(_me.name)
        draining.set() if status == AgentStatus.DISABLED else draining.clear()
        wanted = status != AgentStatus.DISABLED and holder is None
        command = app.control.add_consumer if wanted else app.control.cancel_consumer
        for queue in _me.pool_queues:
            command(queue, destination=[_me.nodename])
        if wanted != _me.consuming:
            _me.consuming = wanted
            log.info("agent %s: %s the shared queues", _me.name, "takes" if wanted else "leaves")
        for build_id in [b for b in _me.kept if b != holder]:
            for path in _me.kept.pop(build_id):
                shutil.rmtree(path, ignore_errors=True)


def _heartbeat_loop(register, stop: threading.Event) -> None:
    from agents.executor import end_orphaned_jobs  # it imports this module

    while not stop.wait(settings.AGENT_HEARTBEAT_SECONDS):
        try:
            close_old_connections()
            if services.heartbeat(_me.name) is None:
                register()  # the row was removed under us: put it back
            sync_consumers()
            end_orphaned_jobs(_me.name)
        except Exception:  # the database may be restarting: the next beat tries again
            log.warning("agent %s: heartbeat failed", _me.name, exc_info=True)
    connection.close()


def _hide_environment() -> None:
    """Make this process non-dumpable, so a step running as another (or the same, non-root)
    user cannot read the agent's environment (database URL, keys) from /proc/PID/environ."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        log.warning("agent: could not make the process non-dumpable")


def run_agent(name: str, labels: list[str], capacity: int, loglevel: str = "INFO") -> None:
    global _me
    pool_queues = [retry_queue(label) for label in labels] + [job_queue(label) for label in labels]
    _me = Identity(name, f"{name}@{socket.gethostname()}", pool_queues)
    _hide_environment()
    from ciproject import __version__

    def register(starting=False):
        services.register_agent(
            name, socket.gethostname(), labels, capacity, __version__, starting=starting
        )

    orphans.reap(orphans.directory(name))  # steps a killed run of this agent left running
    register(starting=True)
    agent_metrics.serve(name)
    stop = threading.Event()
    beats = threading.Thread(target=_heartbeat_loop, args=(register, stop), daemon=True)
    queues = [agent_queue(name), *pool_queues]

    @worker_ready.connect(weak=False)
    def start_heartbeats(**kwargs):  # once the worker hears control commands
        threading.Thread(target=sync_consumers, daemon=True).start()
        beats.start()

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
        shut_down(name, stop, beats)


def shut_down(name: str, stop: threading.Event, beats: threading.Thread) -> None:
    """Mark the agent offline once its heartbeats have stopped: a beat still in flight would
    bring it back online (a beat revives an agent the lost-agent sweep marked offline)."""
    stop.set()
    if beats.is_alive():
        beats.join(timeout=SHUTDOWN_JOIN_SECONDS)
        if beats.is_alive():  # stuck on the database: the lost-agent sweep will see it
            log.warning("agent %s: heartbeat still in flight at shutdown", name)
    close_old_connections()
    services.mark_offline(name)
