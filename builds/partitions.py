"""The build-variable table, range-partitioned by the build's creation time.

PostgreSQL's catalog (pg_inherits, pg_get_expr(relpartbound)) is the truth about which
partitions exist; builds.VariablePartition mirrors it for the admin and is reconciled from it
on every upkeep, never trusted alone.

Why not django-postgres-extra's partitioning manager: it deletes a partition with DROP TABLE,
which takes an ACCESS EXCLUSIVE lock on the parent and stalls every build writing variables
for as long as the drop waits; and its migrations create a DEFAULT partition, which rules out
DETACH ... CONCURRENTLY and would silently swallow rows whose partition is missing. Here a
purge detaches concurrently (PostgreSQL 14+), then drops the detached table, and there is no
default partition: a write with no partition fails loudly (VariablePartitionMissing).
"""

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from builds.models import PartitionState, VariablePartition
from ciproject import metrics

log = logging.getLogger(__name__)

PARENT = "builds_buildvariable"
NAME_RE = re.compile(rf"{PARENT}_p\d{{8}}(?:_\d{{6}})?")
BOUND_RE = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class CatalogPartition:
    name: str
    start: datetime
    end: datetime
    detach_pending: bool
    rows_estimate: int


def partition_size() -> timedelta:
    return timedelta(seconds=settings.VARIABLE_PARTITION_SECONDS)


def retention() -> timedelta:
    return timedelta(days=settings.VARIABLE_RETENTION_DAYS)


def bounds_for(moment: datetime) -> tuple[datetime, datetime]:
    """The partition range [start, end) holding `moment`, aligned on the epoch (UTC)."""
    size = partition_size()
    start = EPOCH + ((moment - EPOCH) // size) * size
    return start, start + size


def name_for(start: datetime) -> str:
    suffix = start.strftime("%Y%m%d") if start.time() == datetime.min.time() else None
    return f"{PARENT}_p{suffix or start.strftime('%Y%m%d_%H%M%S')}"


def catalog() -> list[CatalogPartition]:
    """The partitions attached to (or being detached from) the parent, oldest first."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending,"
            " greatest(c.reltuples, 0)::bigint"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass",
            [PARENT],
        )
        rows = cursor.fetchall()
    partitions = []
    for name, bound, pending, estimate in rows:
        match = BOUND_RE.search(bound or "")
        if match:
            start, end = (datetime.fromisoformat(v) for v in match.groups())
            partitions.append(CatalogPartition(name, start, end, pending, estimate))
    return sorted(partitions, key=lambda p: p.start)


def detached_leftovers() -> list[str]:
    """Our partition tables that are no longer attached: a purge stopped after detaching."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname LIKE %s"
            " AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)",
            [f"{PARENT}\\_p%"],
        )
        return [name for (name,) in cursor.fetchall() if NAME_RE.fullmatch(name)]


def ensure(now: datetime | None = None, ahead: int | None = None) -> list[str]:
    """Create the partition holding `now` and the next `ahead` ones. Idempotent."""
    now = now or timezone.now()
    ahead = settings.VARIABLE_PARTITIONS_AHEAD if ahead is None else ahead
    existing = {p.start for p in catalog()}
    start, _ = bounds_for(now)
    created = []
    for _ in range(ahead + 1):
        end = start + partition_size()
        if start not in existing:
            name = name_for(start)
            with connection.cursor() as cursor:
                cursor.execute(
                    f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF "{PARENT}"'
                    " FOR VALUES FROM (%s) TO (%s)",
                    [start, end],
                )
            created.append(name)
            log.info("variable partition %s created [%s, %s)", name, start, end)
        start = end
    reconcile()
    return created


def expired(before: datetime | None = None, now: datetime | None = None) -> list[CatalogPartition]:
    """Partitions wholly older than the retention (or than `before`), oldest first."""
    cutoff = before or (now or timezone.now()) - retention()
    return [p for p in catalog() if p.end <= cutoff]


def purge(before=None, dry_run=False, by: str = "purge", now=None) -> list[str]:
    """Drop the expired partitions without blocking writers: DETACH ... CONCURRENTLY (which
    runs outside any transaction), then DROP the detached table. A purge interrupted half way
    is finished by the next: pending detaches are FINALIZEd and detached leftovers dropped."""
    doomed = expired(before, now)
    leftovers = detached_leftovers()
    names = [p.name for p in doomed] + leftovers
    if dry_run:
        return names
    if connection.in_atomic_block:
        raise RuntimeError("purge must run outside a transaction (DETACH CONCURRENTLY)")
    started = timezone.now()
    for partition in doomed:
        _mark(partition.name, PartitionState.DETACHING)
        with connection.cursor() as cursor:
            if partition.detach_pending:  # an earlier purge stopped mid-detach
                cursor.execute(
                    f'ALTER TABLE "{PARENT}" DETACH PARTITION "{partition.name}" FINALIZE'
                )
            else:
                cursor.execute(
                    f'ALTER TABLE "{PARENT}" DETACH PARTITION "{partition.name}" CONCURRENTLY'
                )
        _drop(partition.name, by)
    for name in leftovers:
        _drop(name, by)
    if names:
        metrics.PURGE_SECONDS.observe((timezone.now() - started).total_seconds())
    reconcile()
    return names


def _drop(name: str, by: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f'DROP TABLE IF EXISTS "{name}"')
    VariablePartition.objects.filter(name=name).update(
        state=PartitionState.DROPPED, dropped_at=timezone.now(), dropped_by=by
    )
    log.info("variable partition %s dropped by %s", name, by)


def _mark(name: str, state: str) -> None:
    VariablePartition.objects.filter(name=name).update(state=state)


def reconcile() -> None:
    """Make VariablePartition mirror the catalog."""
    with transaction.atomic():
        seen = set()
        for p in catalog():
            seen.add(p.name)
            VariablePartition.objects.update_or_create(
                name=p.name,
                defaults={
                    "range_start": p.start,
                    "range_end": p.end,
                    "rows_estimate": p.rows_estimate,
                    "state": PartitionState.DETACHING if p.detach_pending else PartitionState.LIVE,
                    "dropped_at": None,
                    "dropped_by": "",
                },
            )
        leftovers = set(detached_leftovers())
        gone = VariablePartition.objects.exclude(name__in=seen).exclude(
            state=PartitionState.DROPPED
        )
        gone.filter(name__in=leftovers).update(state=PartitionState.DETACHING)
        gone.exclude(name__in=leftovers).update(
            state=PartitionState.DROPPED,
            dropped_at=timezone.now(),
            dropped_by="found missing from the catalog",
        )


def earliest_retryable(now: datetime | None = None) -> datetime | None:
    """The earliest build creation time whose variables are still kept and will be for at
    least the safety margin: the start of the oldest live partition that the purge will not
    reach within the margin. None when no partition qualifies."""
    now = now or timezone.now()
    safe_until = now + timedelta(seconds=settings.RETRY_SAFETY_MARGIN_SECONDS)
    for p in catalog():
        if not p.detach_pending and p.end + retention() > safe_until:
            return p.start
    return None


def partition_exists_for(moment: datetime) -> bool:
    return any(p.start <= moment < p.end and not p.detach_pending for p in catalog())
