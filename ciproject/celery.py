"""The Celery app, the one way to publish, and beat's schedule. Queues (ciproject.protocol):

- controller: server-side work (advance a build, sweeps);
- jobs.<label>: jobs waiting for any agent with that label;
- retry.<label>: retried jobs (attempt > 1), consumed beside jobs.<label>;
- agent.<name>: work pinned to one agent.
"""

import logging
import os

from celery import Celery, signals
from celery.worker import state as worker_state
from django.db import close_old_connections
from kombu.exceptions import OperationalError

from ciproject.protocol import CONTROLLER_QUEUE

log = logging.getLogger(__name__)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ciproject.settings")

app = Celery("ciproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Celery keeps the ids of a worker's last 1,000 successful tasks (for 3 h), for two checks
# only: a redelivered task already done (task_deduplicate_successful_tasks, off here: every
# task is fenced by the database) and, on a lost broker connection, a task that succeeded
# but is not acknowledged yet (at most the worker's concurrency: 64 for an agent). Those
# 1,000 ids, ~250 bytes each, made agents and the controller grow until their 1,000th task;
# 64 are enough for both checks, and fill up within the first jobs.
SUCCESSFUL_IDS_KEPT = 64
worker_state.successful_requests.maxlen = SUCCESSFUL_IDS_KEPT

# The options of the tasks run per job (run_job, advance_build): a success's result is not
# stored (nothing reads it, and it cost a read and a write per task), a failure or a revoked
# message's still is (django_celery_results).
ERRORS_ONLY = {"ignore_result": True, "store_errors_even_if_ignored": True}


@signals.task_prerun.connect(weak=False)
@signals.task_postrun.connect(weak=False)
def _recycle_connections(**kwargs) -> None:
    """Each task as a Django request: a connection is kept across tasks while it is healthy
    and younger than CONN_MAX_AGE (one that died with a restart of PostgreSQL is replaced
    before the task's first query); see CELERY_DB_REUSE_MAX in the settings."""
    close_old_connections()


def publish(call, *args, **kwargs) -> bool:
    """Send a message about what PostgreSQL already holds (`call` is app.send_task or a
    control command). If the broker cannot take it, log and go on: beat's sweeps re-drive
    from the database what the message would have done, so no request and no job's end
    fails, or waits long, because the broker is down."""
    try:
        call(*args, **kwargs)
        return True
    except Exception as exc:
        name = args[0] if args and isinstance(args[0], str) else call.__name__
        log.warning(
            "broker unreachable, %s not sent (the sweeps re-drive it): %s", name, exc,
            exc_info=not isinstance(exc, (OSError, OperationalError)),  # a bug: its traceback
        )  # fmt: skip
        return False


app.conf.beat_schedule = {
    "ensure-partitions": {
        "task": "builds.tasks.ensure_partitions",
        "schedule": 3600.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 3600},
    },
    "purge-partitions": {
        "task": "builds.tasks.purge_partitions",
        "schedule": 3600.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 3600},
    },
    "expire-artifacts": {
        "task": "artifacts.tasks.expire_artifacts",
        "schedule": 3600.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 3600},
    },
    "purge-audit-events": {
        "task": "audit.tasks.purge_events",
        "schedule": 3600.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 3600},
    },
    "purge-dead-tokens": {
        "task": "tokens.tasks.purge_tokens",
        "schedule": 3600.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 3600},
    },
    "deliver-commit-statuses": {
        "task": "forge.tasks.deliver_statuses",
        "schedule": 2.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 2},
    },
    "fire-schedules": {
        "task": "forge.tasks.fire_schedules",
        "schedule": 20.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 20},
    },
    "sweep-queues": {
        "task": "builds.tasks.sweep_queues",
        "schedule": 5.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 5},
    },
    "cancel-watchdog": {
        "task": "builds.tasks.cancel_watchdog",
        "schedule": 2.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 2},
    },
    "reconcile-running-builds": {
        "task": "builds.tasks.reconcile_running_builds",
        "schedule": float(os.environ.get("RECONCILE_SECONDS", 15)),
        "options": {"queue": CONTROLLER_QUEUE, "expires": 15},
    },
    "sweep-leases": {
        "task": "agents.tasks.sweep_leases",
        "schedule": 10.0,
        "options": {"queue": CONTROLLER_QUEUE, "expires": 10},
    },
    "mark-lost-agents": {
        "task": "agents.tasks.mark_lost_agents",
        "schedule": float(os.environ.get("AGENT_SWEEP_SECONDS", 5)),
        "options": {"queue": CONTROLLER_QUEUE, "expires": 10},
    },
}
