"""Runs a job on this agent: its steps in order, in the job's workspace, with automatic
retries, logs streamed to PostgreSQL, and the results recorded through builds.services."""

import logging
import shutil
import time
from pathlib import Path

from django.conf import settings

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
    job = services.start_job(job_id, attempt, agent)
    if job is None:
        log.info("job %s attempt %s: stale or duplicate message, ignored", job_id, attempt)
        return None
    workspace = workspace_for(agent, job)
    workspace.mkdir(parents=True, exist_ok=True)
    status, reason = RunStatus.SUCCEEDED, ""
    try:
        for step in job.steps.filter(status__in=(RunStatus.PENDING, RunStatus.QUEUED)):
            step.job = job
            step_status = run_step_attempts(job, step, workspace)
            if step_status is None:  # the step was taken from us (stale attempt)
                return None
            if step_status != RunStatus.SUCCEEDED and not step.continue_on_error:
                status = step_status
                reason = f"step {step.name!r} ended {step_status}"
                break
    except Exception as exc:
        log.exception("job %s attempt %s failed on the agent", job_id, attempt)
        status, reason = RunStatus.FAILED, f"agent error: {exc.__class__.__name__}: {exc}"
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    services.finish_job(job, status, reason)
    return status


def run_step_attempts(job: JobRun, step: StepRun, workspace: Path) -> str | None:
    """Run a step, retrying it automatically up to its `retry` count."""
    if not services.start_step(step):
        return None
    retries_left = step.max_retries
    while True:
        writer = LogWriter(step)
        outcome, notice = _run_once(job, step, workspace, writer)
        status = RunStatus.SUCCEEDED if outcome.exit_code == 0 else RunStatus.FAILED
        if outcome.timed_out:
            status = RunStatus.TIMED_OUT
        if status != RunStatus.SUCCEEDED and retries_left > 0:
            writer.write(f"{notice}[ciproject] retrying automatically ({retries_left} left)\n")
            if not services.next_attempt(step):
                return None
            retries_left -= 1
            continue
        writer.write(notice)
        if not services.finish_step(
            step, step.attempt, status, outcome.exit_code, outcome.variables
        ):
            return None
        return status


def _run_once(job: JobRun, step: StepRun, workspace: Path, writer: LogWriter):
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
        return False

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
    if outcome.timed_out:
        notice += (
            f"[ciproject] step timed out after {step.timeout} s; its process group was killed\n"
        )
    else:
        notice += f"[ciproject] exit code {outcome.exit_code} after {elapsed:.1f} s\n"
    writer.write(output.take())
    return outcome, notice
