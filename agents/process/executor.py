"""Runs a job on this agent: its steps in order, in the job's workspace, with automatic
retries, logs streamed to PostgreSQL, and the results recorded through builds.services.
`agent` is the AgentProcess running it (agents.process.agent, which imports this module)."""

import contextlib
import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from agents.process import artifacts as agent_artifacts
from agents.process import caches, checkout, containment, orphans, workspaces
from agents.process.runner import StepOutcome, StepOutput, run_step, step_environment
from artifacts import services as artifacts
from builds import conditions, matrix, services, source
from builds.definition import DEFAULT_RETRY_RULE, MAX_RETRY_BACKOFF
from builds.errors import BuildVariablesMissing
from builds.models import JobRun, StepRun
from builds.statuses import RunStatus
from ciproject import metrics
from ciproject.log_format import log_context
from ciproject.sizes import format_size
from dispatch import messages
from vault import services as vault
from vault.masking import Masker

log = logging.getLogger(__name__)

DATABASE_ERRORS = (OperationalError, InterfaceError)
# How often a running step looks whether it was asked to stop: a cancel waits for the next look.
STOP_TICK_SECONDS = 0.02
# How long a job waits for the controller to seal its secrets, and how often it looks.
SECRETS_WAIT_SECONDS = 30
SECRETS_POLL_SECONDS = 0.02
SECRETS_ASK_AGAIN_SECONDS = 1

WAITING = (RunStatus.PENDING, RunStatus.QUEUED)  # a step's statuses before it starts


def persist(write, *args):
    """Run a database write, retrying while PostgreSQL is unreachable (a restart, a failover)
    for up to AGENT_DB_RETRY_SECONDS: a step's result is retried, never dropped."""
    deadline = time.monotonic() + settings.AGENT_DB_RETRY_SECONDS
    delay = 0.2
    while True:
        try:
            return write(*args)
        except DATABASE_ERRORS:
            if time.monotonic() > deadline:
                raise
            log.warning("database unreachable; retrying %s in %.1f s", write.__name__, delay)
            connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 5)


class LogWriter:
    """Appends a step attempt's output to its log, a chunk at a time. A chunk gets its
    number once: while the database is unreachable the chunks are kept and sent again as
    they were (a chunk whose commit went through before the connection dropped is ignored
    the second time), and what the step prints meanwhile goes in the next ones, so nothing
    is lost and nothing is stored twice."""

    def __init__(self, step: StepRun):
        self.step_id, self.attempt = step.pk, step.attempt
        self.next_seq = 0
        self.unsent: list[tuple[int, str]] = []  # (seq, text), oldest first
        self.flushed_at = time.monotonic()

    def write(self, text: str, final: bool = False) -> None:
        if text:  # a quiet step's next line goes at once: followers see it within a tick
            self.flushed_at = time.monotonic()
            self.unsent.append((self.next_seq, text))
            self.next_seq += 1
        while self.unsent:
            seq, chunk = self.unsent[0]
            try:
                if final:
                    persist(services.append_log, self.step_id, self.attempt, seq, chunk)
                else:
                    services.append_log(self.step_id, self.attempt, seq, chunk)
            except DATABASE_ERRORS:
                if final:
                    raise
                connection.close()
                log.warning("step %s: log chunks kept until the database answers", self.step_id)
                return
            self.unsent.pop(0)

    def due(self) -> bool:
        return time.monotonic() - self.flushed_at >= settings.STEP_LOG_FLUSH_SECONDS


def workspace_for(agent: str, job: JobRun) -> Path:
    """A job's workspace; a job that reuses another's agent works in that job's. A matrix
    run's name may hold any character: its directory is named by its job and a digest."""
    root = Path(settings.AGENT_WORKSPACE_ROOT) / agent / f"build-{job.build_id}"
    if job.matrix_of:
        return root / f"{job.matrix_of}-{hashlib.sha256(job.key.encode()).hexdigest()[:12]}"
    return root / (job.reuse_of or job.key)


def execute_job(agent, job_id: int, attempt: int) -> str | None:
    """Run one job attempt to its end. Returns its final status, or None for a stale message."""
    # Tracked before it starts, so a stop that races the start is not lost.
    with log_context(job_id=job_id, attempt=attempt), agent.tracking(job_id, attempt) as stop:
        if agent.lapsed():  # fenced: it would be stopped at once; an agent in touch takes it
            log.info("job %s attempt %s: handed back, this agent is fenced", job_id, attempt)
            with contextlib.suppress(*DATABASE_ERRORS):  # unsent, the sweep sends it again
                services.requeue_job(job_id, attempt)
            return None
        try:
            job = services.start_job(job_id, attempt, agent.name, agent.draining.is_set())
        except services.HandBack:  # not for this agent now: another one takes it
            services.requeue_job(job_id, attempt)
            return None
        if job is None:
            log.info("job %s attempt %s: stale, duplicate or cancelled; ignored", job_id, attempt)
            return None
        with log_context(build_id=job.build_id):
            return _run_started_job(agent, job, stop)


def _run_started_job(agent, job: JobRun, stop: threading.Event) -> str:
    log.info("job %s attempt %s: running on %s", job.pk, job.attempt, agent.name)
    try:
        if job.takes_lease:
            agent.request_sync()  # leased to this build now: leave the shared queues
        workspace = workspace_for(agent.name, job)
        try:
            execution = JobExecution(job, workspace, stop, agent)
        except BuildVariablesMissing as exc:  # purged: its steps must not run without them
            status, reason = RunStatus.FAILED, exc.detail
        else:
            status, reason = execution.run()
        stop.set()  # its steps are over: nothing left to stop (a late stop request is no news)
        agent.forced_stop(job.pk, job.attempt).set()
        if fenced := agent.fence_reason(job.pk, job.attempt):
            status, reason = RunStatus.FAILED, fenced  # cut off, it stopped the job itself
        # Fenced: a stale attempt changes nothing.
        after_cancel = job.cleanup_left is not None  # its own ending counts, unless forced
        recorded = persist(services.finish_job, job, status, reason, after_cancel)
        log.info(
            "job %s attempt %s: ended %s%s%s",
            job.pk, job.attempt, status, f" ({reason})" if reason else "",
            "" if recorded else "; not recorded: no longer this attempt's to end",
        )  # fmt: skip
        return status
    except Exception as exc:
        # The job is RUNNING on an agent that goes on heartbeating: nothing else would end
        # it, and its build, concurrency slot and lease would wait for ever. (A step that
        # was running is already stopped: run_step ends its process group however it
        # exits.)
        log.exception("job %s attempt %s: agent error", job.pk, job.attempt)
        _end_after_error(job, agent_error(agent.name, exc))
        return RunStatus.FAILED


def agent_error(agent: str, exc: Exception) -> str:
    return f"agent error on {agent}: {exc.__class__.__name__}: {exc}"


def _end_after_error(job: JobRun, reason: str) -> None:
    try:
        persist(services.finish_job, job, RunStatus.FAILED, reason)
    except Exception:
        log.critical(
            "job %s attempt %s: could not record it FAILED (%s); this agent's heartbeat ends"
            " it once the database answers",
            job.pk,
            job.attempt,
            reason,
            exc_info=True,
        )


RERUN_NOTE = (
    "re-run from its first step: the workspace its earlier steps worked in is gone (a failed"
    " job's is kept on its agent for AGENT_KEEP_FAILED_WORKSPACE_SECONDS, and the retry went"
    " elsewhere or came later)"
)


class JobExecution:
    def __init__(self, job: JobRun, workspace: Path, stop: threading.Event, agent):
        self.job, self.build, self.workspace, self.stop = job, job.build, workspace, stop
        self.keep_workspace = agent.keep_workspace  # (build id, path): for the build's lease
        self.containment, self.step_user = agent.containment, agent.step_user
        self.fence_reason = agent.fence_reason
        self.cause = ""  # why the last step failed, when its exit code does not say
        # The job's timeout (all its steps together), by this process's monotonic clock.
        self.deadline = time.monotonic() + job.timeout if job.timeout else None
        self.deadline_cause = f"the job's timeout of {job.timeout} s ran out"
        # After a cancel's stop, its cleanup steps run until a forced stop (or their time).
        self.forced, self.cleaning = agent.forced_stop(job.pk, job.attempt), False
        # A job started after its build's cancel (its condition runs it then) is all cleanup.
        self.after_cancel = job.cleanup_left is not None
        if self.after_cancel:
            self.stop, self.cleaning = self.forced, True
            ends = time.monotonic() + max(job.cleanup_left.total_seconds(), 0)
            if self.deadline is None or ends < self.deadline:
                self.deadline = ends
                self.deadline_cause = f"its cleanup-timeout of {job.cleanup_timeout} s ran out"
        # What the job's steps see: the build's variables when the job starts, plus what its
        # own steps set. Never what a parallel job happens to have set meanwhile.
        self.variables = services.build_variables(job.build)
        # The secrets it names, in its steps' environment only, masked in their logs; and
        # the attempt's token for web (its artifacts), both sealed to this agent process.
        self.opener, self.secrets, self.masker, self.token = agent.opener, {}, Masker(), ""
        self.uploads = artifacts.uploads(job)  # its `artifacts:`, or None
        # What the job's log says of what came before its first step and after its last:
        # written at the start of the first step's log, and at the end of the last's.
        self.notes, self.last_log = "", None
        # Its `cache:` on this agent: the entry to save after a success, when it missed.
        self.cache_spec, self.cache_missed = job.definition.get("cache"), None
        # The build's commit, put in a new workspace before anything else (None: no checkout:
        # a build of no commit, `checkout: false`, or a job in another job's workspace).
        self.commit, self.git_credentials = source.Source.of(job.build.source), None
        self.checkout_spec = job.definition.get("checkout", {})  # absent from older ones
        if self.commit is None or self.checkout_spec is False or job.reuse_of:
            self.checkout_spec = None

    def run(self) -> tuple[str, str]:
        status, reason = RunStatus.FAILED, ""
        try:
            status, reason = self._run()
            if status == RunStatus.SUCCEEDED and self.cache_missed:
                self.save_cache()
            status, reason = self.upload_artifacts(status, reason)
        except Exception as exc:
            log.exception("job %s attempt %s failed on the agent", self.job.pk, self.job.attempt)
            reason = agent_error(self.job.agent, exc)
        finally:
            self.put_away(status)
        return status, reason

    def _run(self) -> tuple[str, str]:
        # Never run a step in a workspace that silently lacks what it should hold.
        fresh = False  # a workspace of its own, from nothing: the cache's to fill
        # Read once: whether a step is kept from an earlier attempt, and which are left to
        # run. What changes them meanwhile (a cancel) also makes their start refused.
        steps = list(self.job.steps.all())
        if self.job.reuse_of:
            if not workspaces.claim(self.workspace):  # gone with the build's lease
                return RunStatus.FAILED, (
                    f"the workspace of job {self.job.reuse_of!r} is gone (a failed build's is"
                    " kept on its agent for AGENT_KEEP_FAILED_WORKSPACE_SECONDS): a failed-only"
                    " build retry runs that job again"
                )
        elif all(step.status in WAITING for step in steps):
            # A first run or a full job retry: a clean workspace.
            fresh = True
            workspaces.remove(self.workspace)  # (what a failed attempt left here is not wanted)
        elif not workspaces.claim(self.workspace):  # a step retry, its workspace gone
            if not persist(services.rerun_from_first_step, self.job, RERUN_NOTE):
                return RunStatus.CANCELED, "stopped: the build is no longer running"
            fresh, steps = True, list(self.job.steps.all())  # each to run again
        workspaces.make(self.workspace, self.step_user)
        takes = artifacts.takes_artifacts(self.job)
        checks_out = fresh and self.checkout_spec is not None
        if (vault.names_for(self.job) or self.uploads or takes or checks_out) and (
            refused := self.receive_sealed()
        ):
            return (
                (RunStatus.CANCELED, refused) if self.stop.is_set() else (RunStatus.FAILED, refused)
            )
        if checks_out and (refused := self.check_out()):
            return refused
        if takes and (refused := self.download_artifacts()):
            return refused
        if fresh and self.cache_spec:
            self.restore_cache()
        failure = None  # the first failed step's ending: the job's
        for step in (step for step in steps if step.status in WAITING):
            step.job = self.job
            if self.stop.is_set():
                return self.clean_up(failed=failure is not None)
            if not self.wanted(step, failed=failure is not None):
                continue
            status = self.run_step(step)
            if status is None:  # stopped, or the build no longer runs
                return self.clean_up(failed=failure is not None)
            if status != RunStatus.SUCCEEDED and not step.continue_on_error and not failure:
                cause = f": {self.cause}" if self.cause else ""
                failure = status, f"step {step.name!r} ended {status}{cause}"
        if failure:
            return failure
        return RunStatus.SUCCEEDED, self.job.reason if self.job.reason == RERUN_NOTE else ""

    def receive_sealed(self) -> str:
        """Ask the controller for the job's secrets and token, sealed to this agent process,
        and wait for them (no step runs without them). Returns why they did not come, or
        ""."""
        job_id, attempt = self.job.pk, self.job.attempt
        started = asked = time.monotonic()
        messages.seal_secrets(job_id, attempt)
        while not self.stop.wait(SECRETS_POLL_SECONDS):
            if taken := persist(vault.take_sealed, job_id, attempt):
                sealed, error = taken
                if error:
                    return f"no secrets: {error}"
                given = json.loads(self.opener.open(sealed, vault.context(job_id, attempt)))
                self.secrets, self.token = given["secrets"], given["token"]
                self.git_credentials = given.get("git")  # for git alone, never a step
                clone_password = (self.git_credentials or {}).get("password")
                self.masker = Masker([*self.secrets.values(), *filter(None, [clone_password])])
                return ""
            if time.monotonic() - started > SECRETS_WAIT_SECONDS:
                return (
                    "no secrets: the controller did not seal them for this agent within"
                    f" {SECRETS_WAIT_SECONDS} s"
                )
            if time.monotonic() - asked > SECRETS_ASK_AGAIN_SECONDS:  # a message lost, or
                asked = time.monotonic()  # this agent's key not registered yet: ask again
                messages.seal_secrets(job_id, attempt)
        return "stopped while waiting for its secrets"

    def check_out(self) -> tuple[str, str] | None:
        """The build's commit into the new workspace, through the build node's mirror of its
        repository; the job's ending if that failed (git's own words as its reason)."""
        credentials = self.git_credentials or {}
        commit = checkout.Source(
            url=self.commit.repository_url,
            sha=self.commit.sha,
            ref=self.commit.ref,
            depth=self.checkout_spec.get("depth"),
            submodules=self.checkout_spec.get("submodules", False),
            username=credentials.get("username", ""),
            password=credentials.get("password", ""),
        )
        try:
            note = checkout.checkout(
                commit, self.workspace, settings.AGENT_MIRROR_ROOT, self.step_user, self.stop,
                max_bytes=settings.AGENT_MIRROR_MAX_BYTES,
            )  # fmt: skip
        except checkout.Stopped as exc:
            return RunStatus.CANCELED, f"stopped: {exc}"
        except checkout.CheckoutError as exc:
            return RunStatus.FAILED, f"checkout: {exc}"
        self.notes += f"[ciproject] {note}\n"
        return None

    def download_artifacts(self) -> tuple[str, str] | None:
        """The artifacts of the jobs it waits for, into its workspace; the job's ending if
        that failed (or it was stopped meanwhile)."""
        client = agent_artifacts.Client(self.token, self.stop)
        try:
            self.notes += (
                f"[ciproject] {agent_artifacts.download(client, self.workspace, self.step_user)}\n"
            )
        except agent_artifacts.Stopped as exc:
            return RunStatus.CANCELED, f"stopped: {exc}"
        except agent_artifacts.ArtifactError as exc:
            return RunStatus.FAILED, f"artifacts: {exc}"
        finally:
            client.close()
        return None

    def upload_artifacts(self, status: str, reason: str) -> tuple[str, str]:
        """After the steps: the job's artifacts, when its `when` asks for this ending (none
        after a cancel or a fence). A job that could not upload them has failed."""
        when = {RunStatus.SUCCEEDED: ("on_success", "always")}
        when |= dict.fromkeys((RunStatus.FAILED, RunStatus.TIMED_OUT), ("on_failure", "always"))
        if not self.uploads or self.uploads["when"] not in when.get(status, ()):
            return status, reason
        if self.stop.is_set() or self.fence_reason(self.job.pk, self.job.attempt):
            return status, reason
        client = agent_artifacts.Client(self.token, self.stop)
        try:
            note = agent_artifacts.upload(client, self.workspace, self.uploads)
        except agent_artifacts.Stopped:
            return status, reason
        except agent_artifacts.ArtifactError as exc:
            note = f"artifacts not uploaded: {exc}"
            if status == RunStatus.SUCCEEDED:
                status, reason = RunStatus.FAILED, f"artifacts: {exc}"
            else:
                reason += f"; its {note}"
        finally:
            client.close()
        self.note_after(note)
        return status, reason

    def restore_cache(self) -> None:
        """The job's cache, if this agent has an entry of its key; the job goes on without
        it otherwise (and saves one after a success)."""
        try:
            cache = caches.for_job(
                self.cache_spec,
                self.workspace,
                self.job.agent,
                self.build.pipeline_id,
                self.step_user,
            )
            note = caches.restore(cache)
        except caches.CacheError as exc:
            self.notes += f"[ciproject] cache not used: {exc}\n"
            return
        if note is None:
            self.cache_missed, note = cache, f"cache {cache.key}: miss"
        self.notes += f"[ciproject] {note}\n"

    def save_cache(self) -> None:
        try:
            self.note_after(caches.save(self.cache_missed))
        except caches.CacheError as exc:
            self.note_after(str(exc))

    def note_after(self, note: str) -> None:
        """A line at the end of the last step's log (or the agent's, when none ran)."""
        log.info("job %s attempt %s: %s", self.job.pk, self.job.attempt, note)
        if self.last_log is not None:
            self.last_log.write(f"[ciproject] {note}\n", final=True)

    def clean_up(self, failed: bool) -> tuple[str, str]:
        """The job was stopped (or its build stopped running): if that was its build's
        cancel, its steps that have not run and whose condition runs them then (always(),
        cancelled()) run now, in its workspace, within its cleanup-timeout; a forced stop (a
        second cancel, a fence) ends them. The job ends CANCELED whatever they do."""
        stopped = RunStatus.CANCELED, "stopped: the build is no longer running"
        if self.forced.is_set() or self.after_cancel:  # a fenced agent must not even ask
            return stopped
        context = self.context(failed, cancelled=True)
        cleanup = [
            step
            for step in self.job.steps.filter(status=RunStatus.PENDING)
            if conditions.stored(step.condition).evaluate(context)
        ]
        asked = time.monotonic()  # before the server sets its deadline: this one is earlier
        if not cleanup or not persist(services.begin_cleanup, self.job):
            return stopped
        timeout = self.job.cleanup_timeout
        log.info("job %s: cancelled; %d cleanup steps run now", self.job.pk, len(cleanup))
        self.stop, self.cleaning = self.forced, True
        self.deadline = asked + timeout
        self.deadline_cause = f"the job's cleanup-timeout of {timeout} s ran out"
        for step in cleanup:
            step.job = self.job
            if self.stop.is_set() or self.run_step(step) is None:
                break
        return RunStatus.CANCELED, f"cancelled; then its cleanup steps ran (at most {timeout} s)"

    def grace_for(self, step: StepRun):
        """The step's kill grace, read when it is stopped: its own, except on a fenced
        agent, which must have ended it within STEP_KILL_GRACE_SECONDS of its fence."""
        default = settings.STEP_KILL_GRACE_SECONDS
        own = default if step.kill_grace is None else step.kill_grace

        def grace() -> float:
            fenced = self.fence_reason(self.job.pk, self.job.attempt)
            return min(own, default) if fenced else own

        return grace

    def context(self, failed: bool, cancelled: bool = False) -> conditions.Context:
        """What a step's condition sees: its job's variables and matrix values."""
        return conditions.Context(
            failed=failed, cancelled=cancelled, vars=self.variables, matrix=self.job.matrix or {}
        )

    def wanted(self, step: StepRun, failed: bool) -> bool:
        """Whether the step's `if:` lets it run now. One whose own condition is false is
        SKIPPED saying so; one that only waited for success is left to finish_job."""
        condition = conditions.stored(step.condition)
        if condition.evaluate(self.context(failed)):
            return True
        if step.condition and (condition.calls_status or not failed):
            persist(services.skip_step, step, f"if: {step.condition} was false")
        return False

    def retries(self, step: StepRun, status: str, outcome: StepOutcome, wait: float) -> bool:
        """Whether the step's retry rule retries this ending, `wait` seconds from now (within
        the job's time)."""
        if self.deadline is not None and time.monotonic() + wait >= self.deadline:
            return False
        if outcome.exit_code is None and not outcome.timed_out:
            return False  # not run (a limit this agent cannot enforce): it would not again
        rule = step.retry_rule or DEFAULT_RETRY_RULE
        if status == RunStatus.TIMED_OUT:
            return "timeout" in rule["on"]
        if status != RunStatus.FAILED or "failure" not in rule["on"]:
            return False
        codes = rule["on_exit_codes"]
        return codes is None or outcome.exit_code in codes

    def put_away(self, status: str) -> None:
        """The workspace after the job: the build's later jobs work in a leased one (kept till
        the lease ends); a failed job's is kept a while for its step retry (the server records
        where: JobRun.kept_workspace_on); any other is removed."""
        if self.job.uses_lease:
            self.keep_workspace(self.job.build_id, self.workspace)
        elif self.job.keeps_workspace_after(status):
            workspaces.keep(self.workspace, settings.AGENT_KEEP_FAILED_WORKSPACE_SECONDS)
        else:
            workspaces.remove(self.workspace)

    def run_step(self, step: StepRun) -> str | None:
        """Run a step, retrying it automatically up to its `retry` count. Returns the status
        recorded, or None if the step could not start or finish as this attempt's."""
        with log_context(step_id=step.pk):
            return self._run_step(step)

    def _run_step(self, step: StepRun) -> str | None:
        if not services.start_step(step, self.cleaning):
            return None
        retries_left = 0 if self.cleaning else step.max_retries
        while True:
            with log_context(step_attempt=step.attempt):
                writer = self.last_log = LogWriter(step)
                if self.notes:  # what came before the first step
                    writer.write(self.notes)
                    self.notes = ""
                started = time.monotonic()
                outcome, notice = self.run_attempt(step, writer)
                status, self.cause = _status_of(outcome), outcome.cause
                metrics.AGENT_STEPS.labels(self.job.agent, status).inc()
                metrics.AGENT_STEP_SECONDS.labels(self.job.agent).observe(
                    time.monotonic() - started
                )
                wait = backoff(step.retry_rule, step.max_retries - retries_left)
                if retries_left > 0 and self.retries(step, status, outcome, wait):
                    retrying = (
                        f"[ciproject] retrying automatically{f' in {wait} s' if wait else ''}"
                        f" ({retries_left} left)\n"
                    )
                    writer.write(notice + retrying, final=True)
                    # A stop meanwhile (a cancel) records this attempt's end, CANCELED.
                    if not self.stop.wait(wait):
                        if not persist(services.next_attempt, step):
                            return None
                        log.info("step %s: %s; retrying automatically", step.pk, status)
                        retries_left -= 1
                        continue
                    notice = ""
                writer.write(notice, final=True)
                recorded = persist(
                    services.finish_step,
                    step,
                    step.attempt,
                    status,
                    outcome.exit_code,
                    outcome.variables,
                    self.cleaning,
                )
                if recorded and recorded != RunStatus.CANCELED:
                    self.variables.update(outcome.variables)
                log.info(
                    "step %s attempt %s: ended %s%s",
                    step.pk, step.attempt, recorded or status,
                    "" if recorded else "; not recorded: no longer this attempt's to end",
                )  # fmt: skip
                return recorded

    def run_attempt(self, step: StepRun, writer: LogWriter) -> tuple[StepOutcome, str]:
        env = step_environment(
            {**self.variables, **self.secrets},
            {
                "CI": "true",
                "CI_BUILD_ID": str(self.build.pk),
                "CI_BUILD_NUMBER": str(self.build.number),
                "CI_PIPELINE_ID": str(self.build.pipeline_id),
                "CI_JOB_ID": str(self.job.pk),
                "CI_JOB_NAME": self.job.key,
                "CI_STEP_ATTEMPT": str(step.attempt),
                "CI_WORKSPACE": str(self.workspace),
                **source.ci_variables(self.build.source),
                **matrix.environment(self.job.matrix or {}),
            },
        )
        output = StepOutput(settings.STEP_LOG_MAX_BYTES, self.masker)

        def on_tick() -> bool:
            if writer.due():
                writer.write(output.take())
            return self.stop.is_set()

        timeout, by_job = step.timeout, False
        job_cause = self.deadline_cause
        if self.deadline is not None and (left := self.deadline - time.monotonic()) < timeout:
            timeout, by_job = max(0.0, left), True
        if by_job and timeout <= 0:  # nothing left of the job's time: not started
            outcome = StepOutcome(exit_code=None, timed_out=True, cause=job_cause)
            return outcome, f"[ciproject] not run: {job_cause}\n"
        limits = limits_for(step)
        name = f"job-{self.job.pk}-{self.job.attempt}-step-{step.pk}-{step.attempt}"
        try:
            box = self.containment.box(name, limits)
        except containment.LimitUnavailable as exc:  # never unlimited instead
            cause = f"not run: {exc}"
            return StepOutcome(exit_code=None, cause=cause), f"[ciproject] {cause}\n"
        started = time.monotonic()
        outcome = run_step(
            step.command,
            cwd=str(self.workspace),
            env=env,
            timeout=timeout,
            output=output,
            grace=self.grace_for(step),
            on_tick=on_tick,
            tick=STOP_TICK_SECONDS,
            markers=orphans.directory(self.job.agent),
            box=box,
            user=self.step_user,
        )
        elapsed = time.monotonic() - started
        notice = output.take() + output.truncation_notice()
        notice += "".join(f"[ciproject] {w}\n" for w in output.warnings)
        notice += _limits_notice(outcome, limits)
        if outcome.stopped:
            notice += "[ciproject] cancelled: the step's processes were stopped\n"
        elif outcome.timed_out and by_job:
            outcome.cause = job_cause
            notice += f"[ciproject] timed out: {outcome.cause}; its processes were killed\n"
        elif outcome.timed_out:
            notice += f"[ciproject] timed out after {step.timeout} s; its processes were killed\n"
        else:
            notice += f"[ciproject] exit code {outcome.exit_code} after {elapsed:.1f} s\n"
        return outcome, notice


def backoff(rule: dict | None, retried: int) -> int:
    """Seconds before the next automatic retry: the rule's backoff, doubling with each
    retry, at most MAX_RETRY_BACKOFF."""
    first = (rule or DEFAULT_RETRY_RULE)["backoff"]
    return min(first * 2**retried, MAX_RETRY_BACKOFF) if first else 0


def limits_for(step: StepRun | None) -> containment.Limits:
    """A step's own limits, or else the agent's defaults (for None: the defaults)."""
    return containment.Limits(
        getattr(step, "max_processes", None) or settings.AGENT_STEP_MAX_PROCESSES or None,
        getattr(step, "max_memory", None) or settings.AGENT_STEP_MAX_MEMORY or None,
    )


def _limits_notice(outcome: StepOutcome, limits: containment.Limits) -> str:
    """What the step's limits did, for its log. Killed by the OOM killer, the step failed,
    whatever its exit code: that is its cause."""
    notice = ""
    if forks := outcome.limit_hits.get("pids"):
        notice += f"[ciproject] {forks} forks refused: max-processes {limits.processes} reached\n"
    if outcome.limit_hits.get("memory"):
        over = format_size(limits.memory)
        outcome.cause = f"killed by the kernel's OOM killer: over its max-memory of {over}"
        notice += f"[ciproject] {outcome.cause}\n"
    return notice


def _status_of(outcome: StepOutcome) -> str:
    if outcome.stopped:
        return RunStatus.CANCELED
    if outcome.timed_out:  # its own timeout, or its job's
        return RunStatus.TIMED_OUT
    if outcome.cause:  # refused, or out of memory: whatever its exit code
        return RunStatus.FAILED
    return RunStatus.SUCCEEDED if outcome.exit_code == 0 else RunStatus.FAILED
