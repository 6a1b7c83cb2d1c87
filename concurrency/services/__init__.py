"""Admission by concurrency policy, and what a group's queue looks like.

Modules, each importing only those above it in this list:

- admission: every decision about a group (admit, the queue order, which queued builds
  start), with the group's row locked;
- queue_positions: read only: a queued build's place in its group's queue and its
  estimated start, for one build, a list of builds or whole groups at once.
"""

from concurrency.services.admission import (
    LIVE_RUNNING,
    admit,
    builds_to_start,
    expired_queued_builds,
    group_key,
    group_limit,
    group_overview,
    lock_group,
    occupying,
    queue_order,
    queued_in_order,
)
from concurrency.services.queue_positions import (
    GroupQueue,
    QueuePlace,
    group_queue,
    group_queues,
    queue_place,
    queue_places,
)

__all__ = [
    "LIVE_RUNNING",
    "GroupQueue",
    "QueuePlace",
    "admit",
    "builds_to_start",
    "expired_queued_builds",
    "group_key",
    "group_limit",
    "group_overview",
    "group_queue",
    "group_queues",
    "lock_group",
    "occupying",
    "queue_order",
    "queue_place",
    "queue_places",
    "queued_in_order",
]
