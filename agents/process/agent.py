"""The agent process: a Celery worker that registers itself, heartbeats, follows what the
server says of it (disabled by an operator, leased to a build), runs the jobs it is sent, and
marks itself offline when it stops. `manage.py runagent` starts it; the run_job task reaches
it through current(), the remote-control commands (agents.process.control) through install()."""

import ctypes
import logging
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from celery.signals import worker_ready
from django.conf import settings
from django.db import close_old_connections, connection, connections
from django.utils import timezone

from agents import services
from agents.models import AgentStatus
from agents.process import containment, control, metrics, orphans, step_user, workspaces
from agents.process.executor import execute_job, limits_for
from builds import services as builds
from ciproject import __version__
from ciproject.celery import app
from ciproject.protocol import agent_queue, job_queue, node_name, retry_queue
from vault import sealing

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
    def __init__(self, name: str, labels: list[str], capacity: int = 1, step_user=None):
        self.name, self.labels, self.capacity = name, labels, capacity
        self.step_user = step_user  # agents.process.step_user.StepUser, or None: the agent's
        self.hostname = socket.gethostname()
        self.opener = sealing.Opener()  # secrets are sealed to this process's key
        self.pool_queues = [retry_queue(label) for label in labels]
        self.pool_queues += [job_queue(label) for label in labels]
        self.workspace_root = Path(settings.AGENT_WORKSPACE_ROOT) / name
        # How its steps' processes are held (found out in run()).
        self.containment = containment.ProcessGroups("an agent that was not started")
        self.consuming = True  # the shared (label and retry) queues
        self.consumer = None  # the worker's consumer, once it is ready (see run)
        # Set while an operator has disabled (drained) this agent: it finishes what it runs
        # and takes no new job from the shared queues.
        self.draining = threading.Event()
        # Workspaces kept for the build leasing this agent: removed once the lease is gone.
        self.kept: dict[int, set[Path]] = {}
        self.lock = threading.Lock()
        # The job attempts running here, each with the event that asks it to stop; a
        # duplicate delivery of a running attempt holds it too (see tracking).
        self.running: dict[tuple[int, int], threading.Event] = {}
        self.forced: dict[tuple[int, int], threading.Event] = {}  # forced stops (cleanup too)
        self.holders: Counter[tuple[int, int]] = Counter()
        self.running_lock = threading.Lock()
        # Self-fencing: when the last heartbeat that reached the database was sent, by this
        # process's monotonic clock; the attempts it stopped for want of one, with the
        # reason, and those it has yet to report once it reaches the database again.
        self.renewed_at = time.monotonic()
        self.fenced: dict[tuple[int, int], str] = {}
        self.unreported: set[tuple[int, int]] = set()
        self.stopping = threading.Event()
        self.beats = threading.Thread(target=self.heartbeat_loop, daemon=True)
        self.fence_watch = threading.Thread(target=self.fence_loop, daemon=True)
        # What may be slow (consumer sync talks to the broker; pruning workspaces, to the
        # disk) runs on a thread of its own, so that it never holds up the heartbeat.
        self.resync = threading.Event()
        self.upkeep = threading.Thread(target=self.upkeep_loop, daemon=True)

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
            self.forced.setdefault(key, threading.Event())
            self.holders[key] += 1
        try:
            yield stop
        finally:
            with self.running_lock:
                self.holders[key] -= 1
                if not self.holders[key]:
                    del self.holders[key], self.running[key], self.forced[key]
                    self.fenced.pop(key, None)

    def running_attempts(self) -> set[tuple[int, int]]:
        """The (job, attempt) pairs running here now."""
        with self.running_lock:
            return set(self.running)

    def request_stop(self, job_id: int, attempt: int, force: bool = True) -> bool:
        """Ask a running attempt to stop; unless `force`d, it may run its cleanup steps then
        (a cancel), which only a forced stop ends. False if it is not running here, or was
        already asked so (or has run its steps: see executor)."""
        key = (job_id, attempt)
        with self.running_lock:
            stop, forced = self.running.get(key), self.forced.get(key)
            if stop is None or (stop.is_set() and (forced.is_set() or not force)):
                return False
            stop.set()
            if force:
                forced.set()
            return True

    def forced_stop(self, job_id: int, attempt: int) -> threading.Event:
        """The event a forced stop sets (tracking creates it): what ends a cleanup."""
        with self.running_lock:
            return self.forced[job_id, attempt]

    def keep_workspace(self, build_id: int, path: Path) -> None:
        with self.lock:
            self.kept.setdefault(build_id, set()).add(path)

    # What the server says of this agent ----------------------------------------------

    def request_sync(self) -> None:
        """Re-read the consumer state soon, on the consumer sync thread."""
        self.resync.set()

    def upkeep_loop(self) -> None:
        while not self.stopping.is_set():
            self.resync.clear()
            try:
                self.sync_consumers()
            except Exception:  # the broker or the database is away: the next round retries
                log.warning("agent %s: consumer sync failed", self.name, exc_info=True)
            for path in workspaces.prune(self.workspace_root):
                log.info("agent %s: kept workspace %s removed, its time is up", self.name, path)
            self.containment.reap_zombies()
            self.resync.wait(settings.AGENT_HEARTBEAT_SECONDS)
        connection.close()

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
            # What Celery's add_consumer and cancel_consumer commands do, called here rather
            # than sent through the broker to this very worker (a round trip each, and a
            # message every worker on the broker has to read).
            consumer = self.consumer
            command = consumer.add_task_queue if wanted else consumer.cancel_task_queue
            for queue in self.pool_queues:
                consumer.call_soon(command, queue)
            if wanted != self.consuming:
                self.consuming = wanted
                log.info(
                    "agent %s: %s the shared queues", self.name, "takes" if wanted else "leaves"
                )
            for build_id in [b for b in self.kept if b != holder]:
                keep = builds.lease_workspaces_wanted(build_id, self.name)
                for path in self.kept.pop(build_id):
                    if keep:  # kept a while more, for a step retry
                        workspaces.keep(path, settings.AGENT_KEEP_FAILED_WORKSPACE_SECONDS)
                    else:
                        workspaces.remove(path)

    def register(self, starting: bool = False) -> None:
        services.register_agent(
            self.name, self.hostname, self.labels, self.capacity, __version__,
            starting=starting, public_key=self.opener.public_key,
            containment=self.containment.describe(),
        )  # fmt: skip

    def heartbeat_loop(self) -> None:
        pause = settings.AGENT_HEARTBEAT_SECONDS
        while not self.stopping.wait(pause):
            try:
                self.beat()
            except Exception:  # the database may be restarting: the next beat tries again
                log.warning("agent %s: heartbeat failed", self.name, exc_info=True)
            # A beat that hung through a cut renews from when it was sent, too long ago to
            # lift the fence: beat again at once rather than stay fenced for a beat.
            pause = 0 if self.lapsed() else settings.AGENT_HEARTBEAT_SECONDS
        connection.close()

    def lapsed(self) -> bool:
        """No heartbeat sent within AGENT_FENCE_SECONDS has reached the database: this agent
        may already be taken for lost, and must not run anything."""
        return time.monotonic() - self.renewed_at > settings.AGENT_FENCE_SECONDS

    def beat(self) -> None:
        """One heartbeat. The hold on the jobs is renewed from the moment it was sent (the
        database's timestamp is later, so the server never counts from earlier than this
        agent does), and only once the agent has also stopped what the server ended or is
        cancelling: a renewal always comes with the stops of its time (see the cancel
        watchdog)."""
        sent = time.monotonic()
        close_old_connections()
        if services.heartbeat(self.name) is None:
            self.register()  # the row was removed under us: put it back
        self.stop_jobs_ended_elsewhere()
        self.renewed(sent)
        self.end_orphaned_jobs()

    def renewed(self, sent: float) -> None:
        """A heartbeat sent at `sent` reached the database: the hold on the jobs is renewed."""
        self.renewed_at = max(self.renewed_at, sent)
        with self.running_lock:
            stopped, self.unreported = sorted(self.unreported), set()
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
        if not self.lapsed():
            return []
        silent = time.monotonic() - self.renewed_at
        reason = (
            f"agent {self.name} fenced itself: no heartbeat reached the database for"
            f" {silent:.0f} s (AGENT_FENCE_SECONDS {settings.AGENT_FENCE_SECONDS:g}), so it"
            " stopped its steps"
        )
        with self.running_lock:
            stopping = sorted(set(self.running) - set(self.fenced))
            self.fenced.update(dict.fromkeys(stopping, reason))
            self.unreported.update(stopping)
        for job_id, attempt in stopping:
            self.request_stop(job_id, attempt)  # not yet asked: it was not in self.fenced
        if stopping:
            log.warning("%s: %s", reason, ", ".join(f"job {j}/{a}" for j, a in stopping))
        return stopping

    def fence_reason(self, job_id: int, attempt: int) -> str | None:
        """Why this attempt was stopped, if the agent fenced itself."""
        with self.running_lock:
            return self.fenced.get((job_id, attempt))

    def end_orphaned_jobs(self) -> list[int]:
        """End the jobs recorded RUNNING here that this process no longer runs (their end
        could not be recorded)."""
        started_before = timezone.now()  # before reading what runs: see end_untracked_jobs
        return builds.end_untracked_jobs(self.name, self.running_attempts(), started_before)

    def stop_jobs_ended_elsewhere(self) -> list[tuple[int, int]]:
        """Stop what runs here for a job the server has ended or is cancelling (a stop
        message may have been lost, or sent while this agent was cut off): an ended job is
        never resumed."""
        stops = builds.ended_elsewhere(self.name, self.running_attempts())
        ended = sorted(stops)
        for job_id, attempt in ended:
            if self.request_stop(job_id, attempt, force=stops[job_id, attempt]):
                log.warning(
                    "agent %s: job %s attempt %s was ended or cancelled by the server; stopping it",
                    self.name, job_id, attempt,
                )  # fmt: skip
        return ended

    # The process -----------------------------------------------------------------------

    def run(self, loglevel: str = "INFO") -> None:
        global _current
        _current = self
        control.install(self)
        _hide_environment()
        _bound_network_waits()
        orphans.reap(orphans.directory(self.name))  # steps a killed run of it left running
        self.containment = containment.detect(
            self.name, Path(settings.AGENT_WORKSPACE_ROOT), settings.AGENT_CGROUP_ROOT
        )  # (and ends what is left in the cgroups of its previous life)
        log.info("agent %s: steps are contained by %s", self.name, self.containment.describe())
        self.check_promises()
        workspaces.adopt(self.workspace_root, settings.AGENT_KEEP_FAILED_WORKSPACE_SECONDS)
        self.register(starting=True)
        metrics.serve(self.name)
        queues = [agent_queue(self.name), *self.pool_queues]

        @worker_ready.connect(weak=False)
        def start_heartbeats(sender, **kwargs):  # once the worker hears control commands
            self.consumer = sender
            self.upkeep.start()
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

    def check_promises(self) -> None:
        """Before it takes a job: the agent can enforce its default limits and run steps as
        its step user; else it does not start (SystemExit, saying why)."""
        try:
            self.containment.check(limits_for(None))
        except containment.LimitUnavailable as exc:
            raise SystemExit(f"agent {self.name}: AGENT_STEP_MAX_*: {exc}") from None
        try:
            if self.step_user:
                self.step_user.check(self.workspace_root)
        except step_user.StepUserError as exc:
            raise SystemExit(f"agent {self.name}: {exc}") from None
        log.info(
            "agent %s: steps run %s", self.name,
            self.step_user.describe() if self.step_user else "as the agent's own user",
        )  # fmt: skip

    def shut_down(self) -> None:
        """Mark the agent offline once its heartbeats have stopped: a beat still in flight
        would bring it back online (a beat revives an agent the lost-agent sweep marked
        offline)."""
        self.stopping.set()
        self.resync.set()
        if self.beats.is_alive():
            self.beats.join(timeout=SHUTDOWN_JOIN_SECONDS)
            if self.beats.is_alive():  # stuck on the database: the lost-agent sweep will see it
                log.warning("agent %s: heartbeat still in flight at shutdown", self.name)
        close_old_connections()
        services.mark_offline(self.name)
        self.containment.close()


def _bound_network_waits() -> None:
    """Cut off, an agent must not hang on a dead connection for the minutes TCP takes to
    give up. A database connection that cannot get an answer within AGENT_FENCE_SECONDS is
    dropped (its beat would be too late to renew the lease anyway), so the next beat
    reconnects as soon as the link is back. RabbitMQ drops the connection this agent had
    before a cut within about AGENT_BROKER_HEARTBEAT_SECONDS: until then it still consumes
    from the agent's queues, and what it takes is lost on the way (see
    CELERY_CONTROL_QUEUE_EXCLUSIVE in the settings)."""
    fence = settings.AGENT_FENCE_SECONDS
    connections.settings["default"].setdefault("OPTIONS", {}).update(
        keepalives=1,
        keepalives_idle=1,
        keepalives_interval=1,
        keepalives_count=max(1, int(fence)),
        tcp_user_timeout=int(fence * 1000),
    )
    app.conf.broker_heartbeat = settings.AGENT_BROKER_HEARTBEAT_SECONDS


def _hide_environment() -> None:
    """Make this process non-dumpable, so a step running as another (or the same, non-root)
    user cannot read the agent's environment (database URL, keys) from /proc/PID/environ."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        log.warning("agent: could not make the process non-dumpable")
