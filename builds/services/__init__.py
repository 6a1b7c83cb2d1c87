"""Every change of state of pipelines, builds, jobs and steps. Each public function is one
transaction; each status change is a compare-and-set through builds.statuses; messages
leave with transaction.on_commit, through dispatch (DESIGN.md principles 1, 2 and 8).
Rows are locked FOR NO KEY UPDATE (no key of a build, a job or an agent ever changes): the
FOR KEY SHARE lock of a foreign-key check, taken by every insert that references one, never
waits for those locks nor they for it.

Modules, each importing only those above it in this list:

- pipelines: creating and editing pipelines;
- logs: step logs and the server's notes in them;
- execution: what the agents call (start and finish jobs and steps), fenced by attempts;
- progress: queueing the jobs whose wait is over (builds.dag), advancing a build,
  finishing it, starting queued builds;
- lost_agents: what a lost agent costs its jobs (the registry, agents.services, decides);
- sweeps: beat's re-drives of what lost messages and long waits left behind;
- cancellation: a cancel request, its batched finish and the watchdog;
- triggering: a new build, admitted by its concurrency policy;
- retry: step and build retries, and can_retry, the one rule for the retry window.
"""

from builds.services.cancellation import cancel_watchdog, finish_cancel, request_cancel
from builds.services.execution import (
    HandBack,
    begin_cleanup,
    build_variables,
    end_untracked_jobs,
    ended_elsewhere,
    finish_job,
    finish_step,
    lease_workspaces_wanted,
    next_attempt,
    rerun_from_first_step,
    skip_step,
    start_job,
    start_step,
)
from builds.services.logs import append_log, step_log
from builds.services.lost_agents import (
    agents_left_with_work,
    fail_jobs_of_lost_agent,
    fail_jobs_on_agent,
)
from builds.services.pipelines import (
    check_policy,
    check_teams,
    policy_named_in,
    save_pipeline,
    validate_pipeline_name,
)
from builds.services.progress import (
    advance_build,
    finish_build,
    requeue_job,
    start_queued_builds,
)
from builds.services.retry import can_retry, retry_build, retry_step
from builds.services.sweeps import (
    fail_unplaced_jobs,
    reconcile_running_builds,
    sweep_leases,
    sweep_queues,
)
from builds.services.triggering import Triggered, trigger, trigger_build

__all__ = [
    "HandBack",
    "Triggered",
    "advance_build",
    "agents_left_with_work",
    "append_log",
    "begin_cleanup",
    "build_variables",
    "can_retry",
    "cancel_watchdog",
    "check_policy",
    "check_teams",
    "end_untracked_jobs",
    "ended_elsewhere",
    "fail_jobs_of_lost_agent",
    "fail_jobs_on_agent",
    "fail_unplaced_jobs",
    "finish_build",
    "finish_cancel",
    "finish_job",
    "finish_step",
    "lease_workspaces_wanted",
    "next_attempt",
    "policy_named_in",
    "reconcile_running_builds",
    "request_cancel",
    "requeue_job",
    "rerun_from_first_step",
    "retry_build",
    "retry_step",
    "save_pipeline",
    "skip_step",
    "start_job",
    "start_queued_builds",
    "start_step",
    "step_log",
    "sweep_leases",
    "sweep_queues",
    "trigger",
    "trigger_build",
    "validate_pipeline_name",
]
