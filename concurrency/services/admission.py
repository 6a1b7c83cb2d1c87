"""Admission by concurrency policy. Every decision about a group happens with its
ConcurrencyGroup row locked (lock_group), inside the transaction that creates,
finishes or retries the build, so a group never runs more than max_running builds and no
queued build is started twice, whatever the interleaving across processes and hosts."""

from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from builds.models import Build
from builds.statuses import BUILD_LIVE, BuildStatus
from ciproject import metrics
from concurrency import keys
from concurrency.errors import PipelineQueueFull
from concurrency.models import ConcurrencyPolicy, OnQueueFull

LIVE_RUNNING = (BuildStatus.RUNNING, BuildStatus.CANCELLING)  # shown as running


def occupying() -> Q:
    """The builds that hold a running slot: RUNNING ones, and CANCELLING ones that had
    started (a build cancelled while it waited in the queue never ran, and holds none)."""
    return Q(status=BuildStatus.RUNNING) | Q(
        status=BuildStatus.CANCELLING, started_at__isnull=False
    )


def lock_group(key: str) -> None:
    """Create the group's row if needed and lock it until the transaction ends, in one
    statement: DO UPDATE locks the row it meets as FOR UPDATE would (and a concurrent first
    insert of the key waits for the other's commit, then meets its row)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO concurrency_concurrencygroup (key, created_at) VALUES (%s, now())"
            " ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key",
            [key],
        )


def group_key(policy: ConcurrencyPolicy, pipeline, variables: dict[str, str]) -> str:
    return keys.render(policy.group_key, pipeline, variables)


def queue_order():
    """The order in which a group's queued builds start: the one rule, which admission
    (builds_to_start), the admin's overview and the queue positions (queue_positions) all
    sort by. Builds put back by a step retry first (queue_priority 1: part of a running
    build's work, so ahead of every priority), then higher priorities first, then FIFO by
    the time each was queued; the id breaks a tie of the same instant."""
    return [
        F("queue_priority").desc(),
        F("priority").desc(),
        F("enqueued_at").asc(),
        F("id").asc(),
    ]


def queued_in_order(*groups: str):
    """The queued builds of `groups`, group by group, each group's in queue order."""
    return Build.objects.filter(concurrency_group__in=groups, status=BuildStatus.QUEUED).order_by(
        "concurrency_group", *queue_order()
    )


def group_limit(head: Build) -> int | None:
    """How many builds of a group may run at once: the max_running of the policy of the
    build at the head of its queue, as it is now; None (no limit) when that policy was
    deleted."""
    return None if head.policy is None else head.policy.max_running


def admit(build: Build, policy: ConcurrencyPolicy, on_evict) -> str:
    """Decide a new build's fate in its group, which the caller has locked (lock_group), by
    `policy` as read in this transaction: RUNNING if a slot is free and nobody is waiting,
    else QUEUED if the queue has room, else the policy's on_queue_full: PipelineQueueFull
    (the caller's transaction then rolls back: nothing is created), or the oldest queued
    build is evicted (`on_evict(build)` ends it). Returns the status."""
    group = Build.objects.filter(
        concurrency_group=build.concurrency_group, status__in=BUILD_LIVE
    ).exclude(pk=build.pk)
    queued = group.filter(status=BuildStatus.QUEUED)
    counts = group.aggregate(
        running=Count("pk", filter=occupying()),
        waiting=Count("pk", filter=Q(status=BuildStatus.QUEUED)),
    )
    running, waiting = counts["running"], counts["waiting"]
    if running < policy.max_running and waiting == 0:
        return _admitted(BuildStatus.RUNNING)
    # With cancel_in_progress the new build replaces the ones it cancelled: it waits for
    # them to stop even when the policy keeps no queue.
    if waiting >= policy.queue_length and not policy.cancel_in_progress:
        # The oldest of the lowest priority; never a build put back by a step retry (queue
        # priority 1): it is part of a running build's work, not a new build. Never one of a
        # higher priority than the new build's either.
        oldest = (
            queued.filter(queue_priority=0, priority__lte=build.priority)
            .order_by("priority", "enqueued_at", "id")
            .first()
        )
        if policy.on_queue_full != OnQueueFull.EVICT_OLDEST or oldest is None:
            metrics.ADMISSIONS.labels("rejected").inc()
            higher = (
                f"; each queued build has a priority above {build.priority}"
                if policy.on_queue_full == OnQueueFull.EVICT_OLDEST
                else ""
            )
            raise PipelineQueueFull(
                f"the queue of group {build.concurrency_group!r} is full: {running} running "
                f"(at most {policy.max_running}) and {waiting} queued (at most "
                f"{policy.queue_length}, policy {policy.name!r}){higher}; try again later",
                group=build.concurrency_group,
                running=running,
                queued=waiting,
            )
        on_evict(oldest)
        transaction.on_commit(metrics.ADMISSIONS.labels("evicted").inc)
    return _admitted(BuildStatus.QUEUED)


def _admitted(status: str) -> str:
    transaction.on_commit(metrics.ADMISSIONS.labels(status.lower()).inc)
    return status


def builds_to_start(group: str) -> list[int]:
    """With the group locked: the queued builds that may start now, in queue order. The
    limit is the policy of the build at the head, as it is now."""
    lock_group(group)
    queued = queued_in_order(group)
    head = queued.select_related("policy").first()
    if head is None:
        return []
    limit = group_limit(head)
    if limit is None:
        return list(queued.values_list("id", flat=True))
    free = limit - Build.objects.filter(occupying(), concurrency_group=group).count()
    return list(queued.values_list("id", flat=True)[: max(free, 0)])


def expired_queued_builds(now=None) -> list[tuple[int, int]]:
    """Queued builds that waited longer than their policy's queue_timeout: (id, timeout)."""
    now = now or timezone.now()
    queued = Build.objects.filter(status=BuildStatus.QUEUED).exclude(policy=None)
    return [
        (build_id, timeout)
        for build_id, enqueued_at, timeout in queued.values_list(
            "id", "enqueued_at", "policy__queue_timeout"
        )
        if enqueued_at and now - enqueued_at > timedelta(seconds=timeout)
    ]


def group_overview(policy: ConcurrencyPolicy) -> list[dict]:
    """Per group of the policy: running and queued builds (in order, with waiting time)."""
    now = timezone.now()
    groups = []
    live = Build.objects.filter(policy=policy, status__in=BUILD_LIVE)
    for key in (
        live.order_by("concurrency_group").values_list("concurrency_group", flat=True).distinct()
    ):
        members = live.filter(concurrency_group=key).select_related("pipeline")
        queued = list(members.filter(status=BuildStatus.QUEUED).order_by(*queue_order()))
        groups.append(
            {
                "key": key,
                "running": list(members.filter(occupying())),
                "queued": [(b, now - b.enqueued_at) for b in queued],
            }
        )
    return groups
