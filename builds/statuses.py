"""The status machines of builds, jobs and steps, in one table each (DESIGN.md).

Every status change goes through `allowed_from(...)` in a compare-and-set
`UPDATE ... WHERE status IN (...)`, so the tables below are the only place the
legal transitions are written down.
"""

from django.db import models


class BuildStatus(models.TextChoices):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"


class RunStatus(models.TextChoices):
    """Status of a job or a step."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    SKIPPED = "SKIPPED"


B, R = BuildStatus, RunStatus

BUILD_FINAL = frozenset({B.SUCCEEDED, B.FAILED, B.CANCELED, B.QUEUE_TIMEOUT})
# The builds a concurrency group's admission counts: a few, however long its history.
BUILD_LIVE = (B.QUEUED, B.RUNNING, B.CANCELLING)
RUN_FINAL = frozenset({R.SUCCEEDED, R.FAILED, R.TIMED_OUT, R.CANCELED, R.SKIPPED})
RUN_FAILED = frozenset({R.FAILED, R.TIMED_OUT, R.CANCELED})
# A job that ends so keeps its workspace on its agent for a while, for its step retry.
KEEPS_WORKSPACE = frozenset({R.FAILED, R.TIMED_OUT})

# to-status -> the statuses it may be reached from.
BUILD_TRANSITIONS: dict[str, frozenset[str]] = {
    B.QUEUED: frozenset(),
    B.RUNNING: frozenset({B.QUEUED}),
    B.CANCELLING: frozenset({B.QUEUED, B.RUNNING}),
    B.SUCCEEDED: frozenset({B.RUNNING}),
    B.FAILED: frozenset({B.RUNNING}),
    B.CANCELED: frozenset({B.CANCELLING}),
    B.QUEUE_TIMEOUT: frozenset({B.QUEUED}),
}

RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    R.PENDING: frozenset(),
    R.QUEUED: frozenset({R.PENDING}),
    R.RUNNING: frozenset({R.PENDING, R.QUEUED}),
    R.SUCCEEDED: frozenset({R.RUNNING}),
    R.FAILED: frozenset({R.RUNNING, R.QUEUED}),  # QUEUED: no agent took it in time
    R.TIMED_OUT: frozenset({R.RUNNING}),
    R.CANCELED: frozenset({R.PENDING, R.QUEUED, R.RUNNING}),
    R.SKIPPED: frozenset({R.PENDING, R.QUEUED}),
}


# Retries take a final status back (with attempt + 1): to-status -> the statuses it may be
# reached from. Kept apart so the normal flow's compare-and-sets never match a final row.
RETRYABLE_RUNS = frozenset({R.FAILED, R.TIMED_OUT, R.CANCELED})
BUILD_RETRY_TRANSITIONS: dict[str, frozenset[str]] = {
    B.QUEUED: frozenset({B.FAILED, B.CANCELED, B.QUEUE_TIMEOUT, B.SUCCEEDED}),
    B.RUNNING: frozenset({B.FAILED, B.CANCELED, B.QUEUE_TIMEOUT, B.SUCCEEDED}),
}
RUN_RETRY_TRANSITIONS: dict[str, frozenset[str]] = {
    R.QUEUED: RETRYABLE_RUNS,  # a job put back in the queue
    R.PENDING: RETRYABLE_RUNS | {R.SKIPPED},  # a step (or what came after it) to run again
}


def build_allowed_from(to: str) -> frozenset[str]:
    return BUILD_TRANSITIONS[to]


def run_allowed_from(to: str) -> frozenset[str]:
    return RUN_TRANSITIONS[to]


def stage_status(job_statuses: list[str]) -> str:
    """A stage's status, derived from its jobs'."""
    live = [s for s in job_statuses if s not in RUN_FINAL]
    if live:
        if any(s == R.RUNNING for s in live) or len(live) < len(job_statuses):
            return R.RUNNING
        return R.QUEUED if R.QUEUED in live else R.PENDING
    for status in (R.FAILED, R.TIMED_OUT, R.CANCELED):
        if status in job_statuses:
            return R.FAILED if status == R.TIMED_OUT else status
    return R.SKIPPED if all(s == R.SKIPPED for s in job_statuses) else R.SUCCEEDED
