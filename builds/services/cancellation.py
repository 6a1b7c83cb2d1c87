"""Cancelling a build. The request is one compare-and-set (QUEUED or RUNNING -> CANCELLING)
whatever the build's size; the rest happens after the response, on the controller, in batched
updates: queued messages are revoked, what has not started is CANCELED (or starts, when its
condition runs it after a cancel), the agents running its jobs are told to stop them (their
cleanup steps run then), and once nothing runs the build ends CANCELED. A watchdog
finishes cancels the agents did not confirm."""

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Max, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce, Greatest, Now
from django.utils import timezone

import audit
from agents.models import Agent
from builds import dag
from builds.errors import BuildAlreadyFinished, BuildNotFound
from builds.models import Build, JobRun, StepRun
from builds.services.logs import add_late_note
from builds.services.progress import advance_build, cancel_waiting_jobs
from builds.statuses import BuildStatus, RunStatus, build_allowed_from
from ciproject import metrics
from ciproject.locks import try_advisory_lock
from ciproject.transactions import retried_on_conflict
from dispatch import messages

log = logging.getLogger(__name__)


@retried_on_conflict
def request_cancel(build_id: int, user=None) -> str:
    """Ask for a build to be cancelled; returns its status (CANCELLING). A second request
    forces the cancel: the cleanup steps its jobs run after the first are stopped too (a
    third changes nothing); a finished build raises BuildAlreadyFinished."""
    started = time.perf_counter()
    with transaction.atomic():
        updated = Build.objects.filter(
            pk=build_id, status__in=build_allowed_from(BuildStatus.CANCELLING)
        ).update(
            status=BuildStatus.CANCELLING,
            cancelled_from=F("status"),  # the value before this UPDATE
            cancel_requested_at=Now(),  # the database's clock, as the watchdog's
            cancel_requested_by=user if user and user.is_authenticated else None,
        )
        if not updated:
            status = Build.objects.values_list("status", flat=True).filter(pk=build_id).first()
            if status is None:
                raise BuildNotFound(f"there is no build with id {build_id}")
            if status != BuildStatus.CANCELLING:
                raise BuildAlreadyFinished(
                    f"build {build_id} already ended {status}; there is nothing to cancel",
                    status=status,
                )
            forced = Build.objects.filter(
                pk=build_id, status=BuildStatus.CANCELLING, cancel_forced_at=None
            ).update(cancel_forced_at=Now())
            if forced:
                audit.record("build.cancel", lambda: _build(build_id), forced=True)
                messages.finish_cancel(build_id)
            return status
        audit.record("build.cancel", lambda: _build(build_id), forced=False)
        messages.finish_cancel(build_id)
    metrics.CANCEL_REQUEST_SECONDS.observe(time.perf_counter() - started)
    return BuildStatus.CANCELLING


def _build(build_id: int) -> Build:  # what the trail names, read only when a person acts
    return (
        Build.objects.select_related("pipeline").only("number", "pipeline__name").get(pk=build_id)
    )


def cancel_at_once(build: Build, reason: str) -> bool:
    """Cancel a QUEUED build, of which nothing runs, within the caller's transaction: for
    eviction from a full queue and for cancel-in-progress."""
    updated = Build.objects.filter(pk=build.pk, status=BuildStatus.QUEUED).update(
        status=BuildStatus.CANCELLING,
        cancelled_from=BuildStatus.QUEUED,
        cancel_requested_at=Now(),
        reason=reason,
    )
    if updated:
        finish_cancel(build.pk)
    return bool(updated)


@retried_on_conflict
def finish_cancel(build_id: int, skip_locked: bool = False) -> str | None:
    """The batched part of a cancel; idempotent, so the watchdog may call it again (with
    skip_locked, so it never queues up behind the controller working on the same build)."""
    with transaction.atomic():
        build = (
            Build.objects.select_for_update(no_key=True, skip_locked=skip_locked)
            .filter(pk=build_id)
            .first()
        )
        if build is None or build.status != BuildStatus.CANCELLING:
            return None
        forced = build.cancel_forced_at is not None
        running = JobRun.objects.filter(build_id=build_id, status=RunStatus.RUNNING)
        if not forced:  # a job running its cleanup (steps, or all of it) goes on
            running = running.filter(cleanup_deadline=None)
        running = list(running.values_list("id", "attempt", "agent"))

        log.info(
            "build %s: cancel%s requested by %s; %d jobs stopping",
            build_id, " (forced)" if forced else "", build.cancel_requested_by or "the system",
            len(running),
        )  # fmt: skip
        for job_id, attempt, agent in running:  # not forced: each may run its cleanup steps
            messages.stop_job(job_id, attempt, agent, force=forced)
    # What has not started is cancelled, or starts if its condition holds after a cancel;
    # the build ends now when nothing was running.
    return advance_build(build_id)


# How long the normal path gets before the watchdog repeats it (a message may be lost).
REDRIVE_AFTER = timedelta(seconds=3)


def force_after() -> timedelta:
    """How long after a cancel request the watchdog may end a job its agent never confirmed.
    By then the agent cannot still be running it: its first heartbeat sent after the
    request (within AGENT_HEARTBEAT_SECONDS) either came back, with the stop (agents stop
    what their build is cancelling), or did not, and then the agent fenced itself within
    AGENT_FENCE_SECONDS of its last renewal and killed the step within the grace period;
    fence + grace + 1 <= AGENT_OFFLINE_AFTER_SECONDS (ciproject.checks). So a cancel never
    frees a slot while the step might run, even on an agent cut off mid-cancel. A job running
    its cleanup steps gets this long after its cleanup_deadline (its agent ends them by its
    own clock, started before the server set the deadline), a forced cancel after the force."""
    return timedelta(
        seconds=settings.AGENT_HEARTBEAT_SECONDS
        + settings.AGENT_OFFLINE_AFTER_SECONDS
        + settings.CANCEL_WATCHDOG_MARGIN_SECONDS
    )


def cancel_watchdog() -> list[int]:
    """Drive CANCELLING builds to CANCELED: repeat the batched part for those still cancelling
    after a few seconds, and after force_after(), end the jobs whose agents never confirmed,
    marking those agents suspect. Returns the builds forced. One watchdog runs at a time: a
    run that finds another under way returns at once."""
    # A session lock, not a transaction's: each build is handled in its own transaction.
    with try_advisory_lock("cancel-watchdog") as acquired:
        return _watch_cancels() if acquired else []


def _watch_cancels(limit: int = 200) -> list[int]:
    forced = []
    stalled = Build.objects.filter(
        status=BuildStatus.CANCELLING, cancel_requested_at__lt=Now() - REDRIVE_AFTER
    )
    rows = _with_due(stalled).order_by("cancel_requested_at")
    for build_id, requested_at, overdue in rows.values_list("id", "cancel_requested_at", "overdue")[
        :limit
    ]:
        if not overdue:
            finish_cancel(build_id, skip_locked=True)
        elif _force_cancel(build_id, requested_at):
            forced.append(build_id)
    return forced


def _with_due(builds):
    """Builds with `overdue`: whether force_after() has passed since their stop was due,
    by the database's clock. It is due from the request, or from the end of the cleanup its
    jobs run (their agents end it by then), or from a forced cancel, which ends the cleanup;
    a step with a kill-grace longer than the agent's gets the difference too."""
    live = JobRun.objects.filter(build=OuterRef("pk"), status__in=dag.LIVE)
    cleanup_ends = live.values("build").annotate(latest=Max("cleanup_deadline"))
    graces = StepRun.objects.filter(
        job__build=OuterRef("pk"), job__status=RunStatus.RUNNING, status=RunStatus.RUNNING
    )
    graces = graces.values("job__build").annotate(longest=Max("kill_grace"))
    longer = Greatest(
        Coalesce(Subquery(graces.values("longest")), 0) - settings.STEP_KILL_GRACE_SECONDS, 0.0
    )
    requested = F("cancel_requested_at")
    due = Coalesce(
        "cancel_forced_at",
        Greatest(requested, Coalesce(Subquery(cleanup_ends.values("latest")), requested)),
    )
    wait = force_after() + longer * timedelta(seconds=1)
    return builds.annotate(due=due, wait=wait).annotate(overdue=Q(due__lt=Now() - F("wait")))


def _force_cancel(build_id: int, requested_at) -> bool:
    """End the jobs of a cancel whose agents never confirmed the stop, and tell those agents
    again (one that was cut off must not go on when it is back). The build was listed before
    its lock was taken: only a build still cancelling from that same request is forced (the
    build row first, then its jobs, as everywhere)."""
    with transaction.atomic():
        still = Build.objects.select_for_update(no_key=True).filter(
            pk=build_id, status=BuildStatus.CANCELLING, cancel_requested_at=requested_at
        )
        if not still.exists():
            return False
        now = timezone.now()
        jobs = list(
            JobRun.objects.select_for_update(no_key=True).filter(
                build_id=build_id, status=RunStatus.RUNNING
            )
        )
        # Asked again with its jobs locked: a cleanup may have begun since it was listed.
        if not _with_due(still).values_list("overdue", flat=True).first():
            return False
        for job in jobs:
            steps = StepRun.objects.filter(job=job, status=RunStatus.RUNNING)
            add_late_note(
                list(steps.values_list("id", "attempt")),
                f"cancelled; agent {job.agent} did not confirm the stop",
            )
            steps.update(status=RunStatus.CANCELED, finished_at=now)
        reason = "cancelled; the agent did not confirm the stop in time"
        JobRun.objects.filter(pk__in=[j.pk for j in jobs]).update(
            status=RunStatus.CANCELED, finished_at=now, reason=reason
        )
        cancel_waiting_jobs(build_id)  # a job queued to run after the cancel too
        agents = {job.agent for job in jobs if job.agent}
        Agent.objects.filter(name__in=agents).update(
            suspect_since=now,
            suspect_reason=f"did not confirm stopping build {build_id} within the grace period",
        )
        if agents:
            log.warning("build %s: agents %s did not confirm the stop", build_id, sorted(agents))
        for job in jobs:
            messages.stop_job(job.pk, job.attempt, job.agent)
    finish_cancel(build_id)
    return True
