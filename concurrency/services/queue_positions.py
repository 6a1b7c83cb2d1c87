"""Where a queued build stands in its concurrency group's queue, and when it may start
(issue 19). Read only: nothing is locked, so the answer is the queue as one moment saw it;
the next admission, start or cancel may change it.

**Position** (1-based) is the build's place among its group's QUEUED builds in
`admission.queue_order()`, the order in which `builds_to_start` starts them (the same
function sorts both, so they cannot disagree): builds put back by a step retry first, then
higher priorities, then the earliest queued, then the lowest id. `of` is how many builds
the group has queued.

**Estimated start** is a simulation of the group's slots:

1. Each pipeline's expected duration is the median of `finished_at - started_at` over its
   last `HISTORY` (20) SUCCEEDED builds, by build number (one query for every pipeline
   involved). A pipeline without one has no expected duration.
2. The group has `group_limit()` slots: the max_running of the policy of the build at the
   head of the queue, as admission counts it. The builds holding a slot (`occupying()`)
   free theirs at their expected end: `started_at` + their pipeline's median, or now if that
   is already past (an overrunning build is expected to end any moment) or if the build is
   CANCELLING (a cancel ends it within its kill grace). A slot held by a build without an
   expected duration is never expected to free.
3. The queued builds take slots in queue order, each when the earliest expected end comes
   (or now, when a slot is free), and hold it for their own pipeline's median. The build at
   position p starts when p slots have been freed for it and the builds ahead of it.
4. A build whose turn needs a slot that is never expected to free (held by a build without
   history, running or queued ahead) gets null: without history there is nothing to
   estimate from, and we do not guess. A group whose head's policy was deleted has no
   limit: every queued build starts now (at the next start or sweep).

It is an estimate: medians, not promises. A build taken back into its queue by a step retry
keeps its first `started_at` (builds.services.retry), so once it runs again it counts as
overrunning, and its duration in the history includes its time in the queue.

Cost: `group_queues` answers for any number of groups in three queries (the queued builds,
the running builds, the medians), so a page listing many builds asks no query per build.
"""

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection
from django.utils import timezone

from builds.models import Build
from builds.statuses import BuildStatus
from concurrency.services.admission import group_limit, occupying, queued_in_order

HISTORY = 20  # a pipeline's expected duration: the median of its last 20 successful builds

# What the queue and the pages showing it read of a build (its name, links, order, slot).
FIELDS = (
    "id", "number", "status", "pipeline", "pipeline__name", "concurrency_group", "priority",
    "queue_priority", "enqueued_at", "started_at", "policy", "policy__name",
    "policy__max_running",
)  # fmt: skip

NEVER = math.inf  # seconds from now to an expected end that no history gives


@dataclass(frozen=True)
class QueuePlace:
    position: int  # 1-based, in queue order
    of: int  # how many builds the group has queued
    estimated_start: datetime | None  # None: no history to estimate from


@dataclass(frozen=True)
class Running:
    build: Build
    expected_end: datetime | None  # None: its pipeline has no history


@dataclass(frozen=True)
class Waiting:
    build: Build
    place: QueuePlace


@dataclass(frozen=True)
class GroupQueue:
    key: str
    limit: int | None  # the head's policy's max_running; None: nothing queued, or no limit
    running: list[Running]  # the builds holding a slot, earliest started first
    queued: list[Waiting]  # in queue order


def queue_place(build: Build, now: datetime | None = None) -> QueuePlace | None:
    """The place of `build` in its group's queue; None unless it is QUEUED."""
    return queue_places([build], now).get(build.pk)


def queue_places(builds: Iterable[Build], now: datetime | None = None) -> dict[int, QueuePlace]:
    """The places of the QUEUED builds among `builds`, by id, in three queries whatever their
    number and groups (none when none is QUEUED)."""
    builds = [b for b in builds if b.status == BuildStatus.QUEUED and b.concurrency_group]
    wanted = {b.pk for b in builds}
    queues = group_queues({b.concurrency_group for b in builds}, now)
    return {
        waiting.build.pk: waiting.place
        for queue in queues.values()
        for waiting in queue.queued
        if waiting.build.pk in wanted
    }


def group_queue(key: str, now: datetime | None = None) -> GroupQueue:
    """One group: its running builds with their expected ends, its queue in order with each
    build's place."""
    return group_queues([key], now)[key]


def group_queues(keys: Iterable[str], now: datetime | None = None) -> dict[str, GroupQueue]:
    """Each group of `keys` (see group_queue), in three queries for them all."""
    keys = sorted({key for key in keys if key})
    if not keys:
        return {}
    now = now or timezone.now()
    queued = queued_in_order(*keys).select_related("pipeline", "policy").only(*FIELDS)
    running = (
        Build.objects.filter(occupying(), concurrency_group__in=keys)
        .select_related("pipeline", "policy")
        .only(*FIELDS)
        .order_by("started_at", "id")
    )
    queued_of, running_of = defaultdict(list), defaultdict(list)
    for build in queued:
        queued_of[build.concurrency_group].append(build)
    for build in running:
        running_of[build.concurrency_group].append(build)
    medians = median_durations(
        {b.pipeline_id for of in (queued_of, running_of) for bs in of.values() for b in bs}
    )
    return {key: _group(key, running_of[key], queued_of[key], medians, now) for key in keys}


def median_durations(pipeline_ids: Iterable[int]) -> dict[int, float]:
    """Seconds: per pipeline, the median duration of its last HISTORY SUCCEEDED builds (by
    number: the index of build numbers finds them). A pipeline without one is left out."""
    ids = sorted(set(pipeline_ids))
    if not ids:
        return {}
    # LATERAL: each pipeline's last builds come from the (pipeline, number) index, never
    # from a scan of its whole history.
    sql = f"""
        SELECT p.id, percentile_cont(0.5) WITHIN GROUP (ORDER BY recent.duration)
        FROM unnest(%s::bigint[]) AS p(id)
        CROSS JOIN LATERAL (
            SELECT b.finished_at - b.started_at AS duration
            FROM {Build._meta.db_table} b
            WHERE b.pipeline_id = p.id AND b.status = %s
              AND b.started_at IS NOT NULL AND b.finished_at IS NOT NULL
            ORDER BY b.number DESC
            LIMIT %s
        ) recent
        GROUP BY p.id
    """  # (the table's name is the model's; every value is a parameter)
    with connection.cursor() as cursor:
        cursor.execute(sql, [ids, BuildStatus.SUCCEEDED, HISTORY])
        rows = cursor.fetchall()
    return {pipeline_id: max(median.total_seconds(), 0.0) for pipeline_id, median in rows}


def _group(key, running, queued, medians, now) -> GroupQueue:
    limit = group_limit(queued[0]) if queued else None
    ends = [_expected_end(build, medians, now) for build in running]
    starts = _starts(ends, [medians.get(b.pipeline_id, NEVER) for b in queued], limit)
    return GroupQueue(
        key=key,
        limit=limit,
        running=[Running(b, _at(now, end)) for b, end in zip(running, ends, strict=True)],
        queued=[
            Waiting(b, QueuePlace(position, len(queued), _at(now, start)))
            for position, (b, start) in enumerate(zip(queued, starts, strict=True), start=1)
        ],
    )


def _expected_end(build: Build, medians: dict[int, float], now: datetime) -> float:
    """Seconds from now until `build` is expected to free its slot (NEVER: unknown)."""
    if build.status == BuildStatus.CANCELLING:
        return 0.0
    median = medians.get(build.pipeline_id)
    if median is None:
        return NEVER
    started = build.started_at or now
    return max((started - now).total_seconds() + median, 0.0)


def _starts(ends: list[float], durations: list[float], limit: int | None) -> list[float]:
    """Seconds from now until each queued build starts, in queue order: with `limit` slots,
    the running builds freeing theirs at `ends`, each queued build taking the next slot to
    free and holding it for its duration (NEVER: unknown, and so is every start that
    waits for it)."""
    if limit is None:
        return [0.0] * len(durations)
    slots = list(ends)  # when each slot in use frees
    heapq.heapify(slots)
    clock, starts = 0.0, []
    for duration in durations:
        while len(slots) >= limit:  # more than one when the limit was lowered meanwhile
            clock = max(clock, heapq.heappop(slots))
        starts.append(clock)
        heapq.heappush(slots, clock + duration)
    return starts


def _at(now: datetime, seconds: float) -> datetime | None:
    return None if seconds == NEVER else now + timedelta(seconds=seconds)
