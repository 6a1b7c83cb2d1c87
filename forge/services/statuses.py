"""Commit statuses: each build of a repository with a status token owes its commit the
build's state. The controller posts the current state whenever it differs from what was
delivered (at once for a new build, then by beat's sweep), retrying a failure with backoff;
nothing here holds a build up, and a forge that is down only delays its statuses.

A row is claimed before its post (next_attempt_at pushed past the post's time), so two
controllers never post the same row at once, and the post runs outside any transaction."""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from builds.models import Build
from builds.statuses import BUILD_FINAL
from ciproject.celery import app, publish
from ciproject.errors import CIError
from ciproject.protocol import CONTROLLER_QUEUE
from forge import status_api
from forge.models import CommitStatus, Repository
from vault import services as vault

log = logging.getLogger(__name__)

CLAIM_SECONDS = 60  # longer than a post's timeout: a claim outlives its post
POST_TIMEOUT_SECONDS = 10
MAX_BACKOFF_SECONDS = 300
MAX_ATTEMPTS = 12  # per state: about half an hour of backoff, then that state is given up
DELIVER_TASK = "forge.tasks.deliver_status"


def owe(build: Build) -> None:
    """Record, with the build (in its trigger's transaction), that its commit is owed its
    statuses, if its repository has a status token; and post the first once it commits."""
    repository = Repository.objects.filter(pipeline_id=build.pipeline_id).first()
    if repository is None or not repository.status_secret or not build.source:
        return
    status = CommitStatus.objects.create(
        build=build, repository=repository, next_attempt_at=timezone.now()
    )
    transaction.on_commit(lambda: send(status.pk))


def send(status_id: int) -> None:
    publish(app.send_task, DELIVER_TASK, args=[status_id], queue=CONTROLLER_QUEUE)


def due(limit: int = 100) -> list[int]:
    """The rows whose build's state differs from what was delivered, and whose wait (after
    a failure, or a claim) is over."""
    # `done` rows count again while their build runs again (a step or build retry).
    owing = Q(done=False) | ~Q(build__status__in=BUILD_FINAL)
    rows = CommitStatus.objects.filter(owing, next_attempt_at__lte=timezone.now())
    rows = rows.exclude(delivered=F("build__status")).order_by("next_attempt_at")
    return list(rows.values_list("pk", flat=True)[:limit])


def deliver_due() -> int:
    """Beat's sweep: post every status that is due; returns how many were posted."""
    return sum(deliver(status_id) for status_id in due())


def _claim(status_id: int) -> CommitStatus | None:
    now = timezone.now()
    claimed = CommitStatus.objects.filter(pk=status_id, next_attempt_at__lte=now)
    if not claimed.update(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS)):
        return None  # another controller has it, or it waits for its backoff
    return CommitStatus.objects.select_related("build__pipeline", "repository").get(pk=status_id)


def deliver(status_id: int) -> bool:
    """Post the build's current state for this row, if it is due; True if it was posted."""
    status = _claim(status_id)
    if status is None:
        return False
    build, repository = status.build, status.repository
    current = build.status
    if current == status.delivered:
        _release(status)
        return False
    state = status_api.forge_state(repository.forge, current)
    now = timezone.now()
    try:
        http_status = _post(repository, build, current, state)
    except (status_api.StatusDeliveryError, CIError) as exc:
        return _failed(status, current, state, exc, now)
    CommitStatus.objects.filter(pk=status.pk).update(
        delivered=current,
        done=current in BUILD_FINAL,
        attempts=0,
        next_attempt_at=now,  # a change since is posted by the next sweep
        last_attempt_at=now,
        last_state=state,
        last_http_status=http_status,
        last_error="",
    )
    log.info("commit status of build %s: %s (%s) delivered", build.pk, state, current)
    return True


def _post(repository: Repository, build: Build, current: str, state: str) -> int:
    token = vault.server_value(build.pipeline, repository.status_secret)
    source = build.source
    api_url = repository.api_url or status_api.default_api_url(
        repository.forge, repository.clone_url
    )
    _host, path = status_api.repository_path(repository.clone_url)
    return status_api.post_status(
        repository.forge,
        api_url,
        path,
        source["sha"],
        state,
        context=f"ciproject/{build.pipeline.name}",
        target_url=target_url(build),
        description=status_api.describe(current),
        ref=source.get("branch") or source.get("tag") or source["ref"],
        token=token,
        timeout=POST_TIMEOUT_SECONDS,
    )


def target_url(build: Build) -> str:
    return settings.PUBLIC_URL.rstrip("/") + reverse("admin:builds_build_change", args=[build.pk])


def _failed(status: CommitStatus, current: str, state: str, exc: Exception, now) -> bool:
    # Tries count per state: those of an earlier state (still failing when the build moved
    # on) do not shorten the next one's.
    attempts = (status.attempts if status.last_state == state else 0) + 1
    retryable = getattr(exc, "retryable", False)
    error = getattr(exc, "detail", None) or str(exc)
    # Only the forge's answer has an HTTP status (a CIError's is the one our API would give).
    answered = isinstance(exc, status_api.StatusDeliveryError)
    fields = {
        "attempts": attempts,
        "last_attempt_at": now,
        "last_state": state,
        "last_http_status": exc.http_status if answered else None,
        "last_error": error[:2000],
    }
    if retryable and attempts < MAX_ATTEMPTS:
        wait = getattr(exc, "retry_after", None) or min(2**attempts, MAX_BACKOFF_SECONDS)
        fields["next_attempt_at"] = now + timedelta(seconds=min(wait, MAX_BACKOFF_SECONDS))
        log.warning(
            "commit status of build %s: %s not delivered (attempt %s), again in %s s: %s",
            status.build_id, state, attempts, wait, error,
        )  # fmt: skip
    else:  # this state is given up; a later one of the build is still posted
        fields |= {"delivered": current, "done": current in BUILD_FINAL, "next_attempt_at": now}
        fields["attempts"] = 0
        log.error(
            "commit status of build %s: %s given up after %s attempts: %s",
            status.build_id, state, attempts, error,
        )  # fmt: skip
    CommitStatus.objects.filter(pk=status.pk).update(**fields)
    return False


def _release(status: CommitStatus) -> None:
    CommitStatus.objects.filter(pk=status.pk).update(next_attempt_at=timezone.now())
