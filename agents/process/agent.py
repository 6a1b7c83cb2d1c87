"""The agent process: a Celery worker that registers itself, heartbeats, follows what the
server says of it (disabled by an operator, leased to a build), runs the jobs it is sent, and
marks itself offline when it stops. `manage.py runagent` starts it; the run_job task reaches
it through current(), the remote-control commands (agents.process.control) through install()."""

import ctypes
import logging
import shutil
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from celery.signals import worker_ready
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from agents import services
from agents.models import AgentStatus
from agents.process import control, metrics, orphans
from agents.process.executor import execute_job
from builds import services as builds
from ciproject import __version__
from ciproject.celery import app
from ciproject.protocol import agent_queue, job_queue, node_name, retry_queue

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
SHUTDOWN_JOIN_SECONDS = 30  # a beat blocked on the database does not hold the exit for ever
FENCE_TICK_SECONDS = 0.5  # how often the fence is checked (within ciproject.checks' margin)

_current: "AgentProcess | None" = None


def current() -> "AgentProcess":
    if _current is None:
        raise RuntimeError("this worker is not an agent: start it with `manage.py runagent`")
    return _current


class AgentProcess:
    def __init__(self, name: str, labels: list[str], capacity: int = 1):
        self.name, self.labels, self.capacity = name, labels, capacity
        self.hostname = socket.gethostname()
        self.nodename = node_name(name, self.hostname)
        self.pool_queues = [retry_queue(label) for label in labels]
        self.pool_queues += [job_queue(label) for label in labels]
        self.consuming = True  # the shared (label and retry) queues
        # Set while an operator has disabled (drained) this agent: it finishes what it runs
        # and takes no new job from the shared queues.
        self.draining = threading.Event()
        # Workspaces kept for the build leasing this agent: removed once the lease is gone.
        self.kept: dict[int, set[Path]] = {}
        self.lock = threading.Lock()
        # The job attempts running here, each with the event that asks it to stop; a
        # duplicate delivery of a running attempt holds it too (see tracking).
        self.running: dict[tuple[int, int], threading.Event] = {}
        self.holders: Counter[tuple[int, int]] = Counter()
        self.running_lock = threading.Lock()
        # Self-fencing: when a heartbeat last reached the database, by this process's
        # monotonic clock; the attempts it stopped for want of one, with the reason.
        self.renewed_at = time.monotonic()
        self.fenced: dict[tuple[int, int], str] = {}
        self.stopping = threading.Event()
        self.beats = threading.Thread(target=self.heartbeat_loop, daemon=True)
        self.fence_watch = threading.Thread(target=self.fence_loop, daemon=True)

    # Jobs -----------------------------------------------------------------------------

    def run_job(self, job_id: int, attempt: int) -> str | None:
        return execute_job(self, job_id, attempt)

    @contextmanager
    def tracking(self, job_id: int, attempt: int):
        """Register a job attempt running here; yields the event that asks it to stop. A
        duplicate delivery of an attempt already running here shares its event and never
        unregisters it, so a stop still reaches the run that is real."""
        key = (job_id, attempt)
        with self.running_lock:
            stop = self.running.setdefault(key, threading.Event())
            self.holders[key] += 1
        try:
            yield stop
        finally:
            with self.running_lock:
                self.holders[key] -= 1
                if not self.holders[key]:
                    del self.holders[key], self.running[key]

    def running_attempts(self) -> set[tuple[int, int]]:
        """The (job, attempt) pairs running here now."""
        with self.running_lock:
            return set(self.running)

    def request_stop(self, job_id: int, attempt: int) -> bool:
        with self.running_lock:
            stop = self.running.get((job_id, attempt))
        if stop is not None:
            stop.set()
        return stop is not None

    def keep_workspace(self, build_id: int, path: Path) -> None:
        with self.lock:
            self.kept.setdefault(build_id, set()).add(path)

    # What the server says of this agent ----------------------------------------------

    def sync_consumers(self) -> None:
        """Consume the shared queues unless disabled or leased to a build (a leased agent gets
        its build's jobs on its own queue: see dispatch.leases); drop workspaces of ended
        leases. The wanted state is asserted again on every heartbeat: a control message may
        be lost."""
        close_old_connections()
        with self.lock:
            status = services.status_of(self.name)
            holder = services.leased_to(self.name)
            self.draining.set() if status == AgentStatus.DISABLED else self.draining.clear()
            wanted = status != AgentStatus.DISABLED and holder is None
            command = app.control.add_consumer if wanted else app.control.cancel_consumer
            for queue in self.pool_queues:
                command(queue, destination=[self.nodename])
            if wanted != self.consuming:
                self.consuming = wanted
                log.info(
                    "agent %s: %s the shared queues", self.name, "takes" if wanted else "leaves"
                )
            for build_id in [b for b in self.kept if b != holder]:
                for path in self.kept.pop(build_id):
                    shutil.rmtree(path, ignore_errors=True)

    def register(self, starting: bool = False) -> None:
        services.register_agent(
            self.name, self.hostname, self.labels, self.capacity, __version__, starting=starting
        )

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(settings.AGENT_HEARTBEAT_SECONDS):
            try:
                close_old_connections()
                if services.heartbeat(self.name) is None:
                    self.register()  # the row was removed under us: put it back
                self.renewed()
                self.sync_consumers()
                self.end_orphaned_jobs()
                self.stop_jobs_ended_elsewhere()
            except Exception:  # the database may be restarting: the next beat tries again
                log.warning("agent %s: heartbeat failed", self.name, exc_info=True)
        connection.close()

    def renewed(self) -> None:
        """A heartbeat reached the database: the agent's hold on its jobs is renewed."""
        self.renewed_at = time.monotonic()
        with self.running_lock:
            stopped = sorted(self.fenced)
        if stopped:
            log.warning(
                "agent %s: reaches the database again; it had stopped %s (fenced)",
                self.name, ", ".join(f"job {j} attempt {a}" for j, a in stopped),
            )  # fmt: skip

    def fence_loop(self) -> None:
        while not self.stopping.wait(FENCE_TICK_SECONDS):
            self.check_fence()

    def check_fence(self) -> list[tuple[int, int]]:
        """Cut off from the database for longer than AGENT_FENCE_SECONDS: stop every step
        running here (SIGTERM, grace, SIGKILL), so that they are dead before the server,
        after AGENT_OFFLINE_AFTER_SECONDS, frees their slots and leases for other builds.
        Returns the attempts it stopped now."""
        silent = time.monotonic() - self.renewed_at
        if silent <= settings.AGENT_FENCE_SECONDS:
            return []
        reason = (
            f"agent {self.name} fenced itself: no heartbeat reached the database for"
            f" {silent:.0f} s (AGENT_FENCE_SECONDS {settings.AGENT_FENCE_SECONDS:g}), so it"
            " stopped its steps"
        )
        with self.running_lock:
            stopping = sorted(set(self.running) - set(self.fenced))
            self.fenced.update(dict.fromkeys(stopping, reason))
        for job_id, attempt in stopping:
            self.request_stop(job_id, attempt)
        if stopping:
            log.warning("%s: %s", reason, ", ".join(f"job {j}/{a}" for j, a in stopping))
        return stopping

    def fence_reason(self, job_id: int, attempt: int) -> str | None:
        """Why this attempt was stopped, if the agent fenced itself; forgotten once asked."""
        with self.running_lock:
            return self.fenced.pop((job_id, attempt), None)

    def end_orphaned_jobs(self) -> list[int]:
        """End the jobs recorded RUNNING here that this process no longer runs (their end
        could not be recorded)."""
        started_before = timezone.now()  # before reading what runs: see end_untracked_jobs
        return builds.end_untracked_jobs(self.name, self.running_attempts(), started_before)

    def stop_jobs_ended_elsewhere(self) -> list[tuple[int, int]]:
        """Stop what runs here for a job the server has ended (a stop message may have been
        lost, or sent while this agent was cut off): an ended job is never resumed."""
        ended = sorted(builds.ended_elsewhere(self.name, self.running_attempts()))
        for job_id, attempt in ended:
            if self.request_stop(job_id, attempt):
                log.warning(
                    "agent %s: job %s attempt %s was ended by the server; stopping it",
                    self.name, job_id, attempt,
                )  # fmt: skip
        return ended

    # The process -----------------------------------------------------------------------

    def run(self, loglevel: str = "INFO") -> None:
        global _current
        _current = self
        control.install(self)
        _hide_environment()
        orphans.reap(orphans.directory(self.name))  # steps a killed run of it left running
        self.register(starting=True)
        metrics.serve(self.name)
        queues = [agent_queue(self.name), *self.pool_queues]

        @worker_ready.connect(weak=False)
        def start_heartbeats(**kwargs):  # once the worker hears control commands
            threading.Thread(target=self.sync_consumers, daemon=True).start()
            self.renewed_at = time.monotonic()  # registered just now
            self.beats.start()
            self.fence_watch.start()

        log.info("agent %s consumes %s", self.name, ", ".join(queues))
        try:
            app.worker_main(
                [
                    "worker",
                    f"--hostname={node_name(self.name, '%h')}",
                    f"--queues={','.join(queues)}",
                    "--pool=threads",
                    f"--concurrency={self.capacity}",
                    f"--loglevel={loglevel}",
                    "--without-gossip",
                    "--without-mingle",
                ]
            )
        finally:
            self.shut_down()

    def shut_down(self) -> None:
        """Mark the agent offline once its heartbeats have stopped: a beat still in flight
        would bring it back online (a beat revives an agent the lost-agent sweep marked
        offline)."""
        self.stopping.set()
        if self.beats.is_alive():
            self.beats.join(timeout=SHUTDOWN_JOIN_SECONDS)
            if self.beats.is_alive():  # stuck on the database: the lost-agent sweep will see it
                log.warning("agent %s: heartbeat still in flight at shutdown", self.name)
        close_old_connections()
        services.mark_offline(self.name)


def _hide_environment() -> None:
    """Make this process non-dumpable, so a step running as another (or the same, non-root)
    user cannot read the agent's environment (database URL, keys) from /proc/PID/environ."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        log.warning("agent: could not make the process non-dumpable")
