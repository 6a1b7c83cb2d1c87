"""Every change of state of pipelines, builds, jobs and steps. Each public function is one
transaction; each status change is a compare-and-set through builds.statuses; messages
leave with transaction.on_commit (DESIGN.md principles 1 and 2)."""

from builds.services.cancellation import cancel_watchdog, finish_cancel, request_cancel
from builds.services.execution import (
    HAND_BACK,
    append_log,
    build_variables,
    fail_jobs_on_agent,
    finish_job,
    finish_step,
    next_attempt,
    start_job,
    start_step,
    step_log,
)
from builds.services.lifecycle import (
    advance_build,
    reconcile_running_builds,
    requeue_job,
    start_queued_builds,
    sweep_queues,
    trigger_build,
)
from builds.services.pipelines import policy_named_in, save_pipeline, validate_pipeline_name
from builds.services.retry import can_retry, retry_build, retry_step

__all__ = [
    "HAND_BACK",
    "advance_build",
    "append_log",
    "build_variables",
    "can_retry",
    "cancel_watchdog",
    "fail_jobs_on_agent",
    "finish_cancel",
    "finish_job",
    "finish_step",
    "next_attempt",
    "policy_named_in",
    "reconcile_running_builds",
    "request_cancel",
    "requeue_job",
    "retry_build",
    "retry_step",
    "save_pipeline",
    "start_job",
    "start_queued_builds",
    "start_step",
    "step_log",
    "sweep_queues",
    "trigger_build",
    "validate_pipeline_name",
]
