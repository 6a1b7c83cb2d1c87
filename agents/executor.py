"""Runs a job on this agent: its steps in order, in the job's workspace, with automatic
retries, logs streamed to PostgreSQL, and the results recorded through builds.services."""

import logging
import shutil
import threading
import time
from pathlib import Path

from django.conf import settings

from agents import control
from agents.runner import StepOutput, run_step, step_environment
from builds import services
from builds.models import JobRun, StepRun
from builds.statuses import RunStatus

log = logging.getLogger(__name__)


class LogWriter:
    """Appends a step attempt's output to its log, a chunk at a time."""

    def __init__(self, step: StepRun):
        self.step_id, self.attempt = step.pk, step.attempt
        self.seq = 0
        self.flushed_at = time.monotonic()

    def write(self, text: str) -> None:
        if text:
            services.append_log(self.step_id, self.attempt, self.seq, text)
            self.seq += 1
        self.flushed_at = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.flushed_at >= settings.STEP_LOG_FLUSH_SECONDS


def workspace_for(agent: str, job: JobRun) -> Path:
    return Path(settings.AGENT_WORKSPACE_ROOT) / agent / f"build-{job.build_id}" / job.key


def execute_job(job_id: int, attempt: int, agent: str) -> str | None:
    """Run one job attempt to its end. Returns its final status, or None for a stale message."""
    # Tracked before it starts, so a stop that races the start is not lost.
    with control.tracking(job_id, attempt) as stop:
        job = services.start_job(job_id, attempt, agent)
        if job is None:
            log.info("job %s attempt %s: stale, duplicate or cancelled; ignored", job_id, attempt)
            return None
        status, reason = _run_steps(job, workspace_for(agent, job), stop)
        services.finish_job(job, status, reason)  # fenced: a stale attempt changes nothing
        return status


def _run_steps(job: JobRun, workspace: Path, stop: threading.Event) -> tuple[str, str]:
    workspace.mkdir(parents=True, exist_ok=True)
    try:
        for step in job.steps.filter(status__in=(RunStatus.PENDING, RunStatus.QUEUED)):
            step.job = job
            step_status = None if stop.is_set() else run_step_attempts(job, step, workspace, stop)
            if step_status is None:  # stopped, or the build no longer runs
                return RunStatus.CANCELED, "stopped: the build is no longer running"
            if step_status != RunStatus.SUCCEEDED and not step.continue_on_error:
                return step_status, f"step {step.name!r} ended {step_status}"
        return RunStatus.SUCCEEDED, ""
    except Exception as exc:
        log.exception("job %s attempt %s failed on the agent", job.pk, job.attempt)
        return RunStatus.FAILED, f"agent error: {exc.__class__.__name__}: {exc}"
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def run_step_attempts(
    job: JobRun, step: StepRun, workspace: Path, stop: threading.Event
) -> str | None:
    """Run a step, retrying it automatically up to its `retry` count. Returns the status
    recorded, or None if the step could not start or finish as this attempt's."""
    if not services.start_step(step):
        return None
    retries_left = step.max_retries
    while True:
        writer = LogWriter(step)
        outcome, notice = _run_once(job, step, workspace, writer, stop)
        status = RunStatus.SUCCEEDED if outcome.exit_code == 0 else RunStatus.FAILED
        if outcome.timed_out:
            status = RunStatus.TIMED_OUT
        if outcome.stopped:
            status = RunStatus.CANCELED
        elif status != RunStatus.SUCCEEDED and retries_left > 0:
            writer.write(f"{notice}[ciproject] retrying automatically ({retries_left} left)\n")
            if not services.next_attempt(step):
                return None
            retries_left -= 1
            continue
        writer.write(notice)
        return services.finish_step(
            step, step.attempt, status, outcome.exit_code, outcome.variables
        )


def _run_once(
    job: JobRun, step: StepRun, workspace: Path, writer: LogWriter, stop: threading.Event
):
    build = job.build
    env = step_environment(
        services.build_variables(build.pk),
        {
            "CI": "true",
            "CI_BUILD_ID": str(build.pk),
            "CI_BUILD_NUMBER": str(build.number),
            "CI_PIPELINE_ID": str(build.pipeline_id),
            "CI_JOB_ID": str(job.pk),
            "CI_JOB_NAME": job.key,
            "CI_STEP_ATTEMPT": str(step.attempt),
            "CI_WORKSPACE": str(workspace),
        },
    )
    output = StepOutput(settings.STEP_LOG_MAX_BYTES)

    def on_tick() -> bool:
        if writer.due():
            writer.write(output.take())
        return stop.is_set()

    started = time.monotonic()
    outcome = run_step(
        step.command,
        cwd=str(workspace),
        env=env,
        timeout=step.timeout,
        output=output,
        grace=settings.STEP_KILL_GRACE_SECONDS,
        on_tick=on_tick,
    )
    elapsed = time.monotonic() - started
    notice = output.truncation_notice()
    notice += "".join(f"[ciproject] {w}\n" for w in output.warnings)
    if outcome.stopped:
        notice += "[ciproject] cancelled: the step's process group was stopped\n"
    elif outcome.timed_out:
        notice += (
            f"[ciproject] step timed out after {step.timeout} s; its process group was killed\n"
        )
    else:
        notice += f"[ciproject] exit code {outcome.exit_code} after {elapsed:.1f} s\n"
    writer.write(output.take())
    return outcome, notice
