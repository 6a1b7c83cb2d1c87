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

The variable table has a foreign key to builds_build, and that makes the purge lock builds_build
too (seen in pg_locks on PostgreSQL 15): finishing a detach (the second phase of DETACH
CONCURRENTLY, or FINALIZE) takes SHARE ROW EXCLUSIVE on it to give the detached table its own
FK triggers, which waits for any open transaction that wrote a build; dropping the detached
table's foreign key takes ACCESS EXCLUSIVE on it to remove those triggers, which waits even
for a reader. A lock request queued there makes every later build read or write queue behind
it, so these statements run under a short lock_timeout (VARIABLE_PURGE_LOCK_TIMEOUT_MS) and,
when it expires, the purge stops and leaves the rest to its next run. The foreign key is
dropped on its own, a change of the catalog only, before the table: DROP TABLE then holds
nothing of builds_build while it unlinks the table's files (a second for 5M rows).
"""

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.utils import timezone

import audit
from builds.errors import PurgeBeforeTooLate
from builds.models import PartitionState, VariablePartition
from ciproject import metrics
from ciproject.locks import try_advisory_lock

log = logging.getLogger(__name__)

PARENT = "builds_buildvariable"
NAME_RE = re.compile(rf"{PARENT}_p\d{{8}}(?:_\d{{6}})?")
BOUND_RE = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of an expired lock_timeout
ANOTHER_PURGE = "another purge is running"


@dataclass
class PurgeResult:
    """The partitions dropped (on a dry run: that would be), in order; `postponed` those left
    for the next run, and `reason` why (a lock wait that timed out, or another purge running)."""

    dropped: list[str] = field(default_factory=list)
    postponed: list[str] = field(default_factory=list)
    reason: str = ""


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
    current = start
    created = []
    for _ in range(ahead + 1):
        end = start + partition_size()
        if start not in existing:
            name = name_for(start)
            create = (
                f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF "{PARENT}"'
                " FOR VALUES FROM (%s) TO (%s)"
            )
            if start == current:  # builds are written to it now: wait as long as it takes
                with connection.cursor() as cursor:
                    cursor.execute(create, [start, end])
            # One ahead takes ACCESS EXCLUSIVE on the parent: bounded like the purge's DDL, so
            # variable reads and writes never queue long behind it; a later run creates it.
            elif not _lock_bounded(create, [start, end]):
                log.warning(
                    "variable partition %s not created: a lock wait on %s took over %s ms"
                    " (a long transaction on it); the next run creates it",
                    name, PARENT, settings.VARIABLE_PURGE_LOCK_TIMEOUT_MS,
                )  # fmt: skip
                break
            created.append(name)
            log.info("variable partition %s created [%s, %s)", name, start, end)
        start = end
    reconcile()
    for name in created:
        audit.record("partition.create", VariablePartition.objects.filter(name=name).first)
    return created


def cutoff(before: datetime | None = None, now: datetime | None = None) -> datetime:
    """Partitions ending by this moment are expired: now minus the retention, or an earlier
    `before`. A later `before` is refused: the retry window promises builds their variables
    for the whole retention, and the newest partitions are still being written."""
    limit = (now or timezone.now()) - retention()
    if before is None:
        return limit
    if before > limit:
        raise PurgeBeforeTooLate(
            f"Cannot purge the partitions ending by {before:%Y-%m-%d %H:%M} UTC: that is later"
            f" than the retention cutoff, {limit:%Y-%m-%d %H:%M} UTC (variables are kept for"
            f" {settings.VARIABLE_RETENTION_DAYS} days). Nothing was changed; give a date on"
            f" or before {limit:%Y-%m-%d}, or lower VARIABLE_RETENTION_DAYS.",
            before=before.isoformat(),
            cutoff=limit.isoformat(),
            retention_days=settings.VARIABLE_RETENTION_DAYS,
        )
    return before


def purge(before=None, dry_run=False, by: str = "purge", now=None) -> PurgeResult:
    """Drop the expired partitions without blocking writers: DETACH ... CONCURRENTLY (which
    runs outside any transaction), then DROP the detached table. A purge interrupted half way
    is finished by the next. One purge runs at a time: a second returns at once."""
    limit = cutoff(before, now)  # before anything: a refused `before` changes nothing
    if dry_run:
        return PurgeResult([name for name, _ in _plan(limit)])
    if connection.in_atomic_block:
        raise RuntimeError("purge must run outside a transaction (DETACH CONCURRENTLY)")
    with try_advisory_lock("variable-partition-purge") as acquired:  # one purge at a time
        if not acquired:
            log.info("variable partition purge by %s skipped: %s", by, ANOTHER_PURGE)
            return PurgeResult(reason=ANOTHER_PURGE)
        return _purge(_plan(limit), by)


def _plan(limit: datetime) -> list[tuple[str, str | None]]:
    """What a purge does, in order: (partition, how to detach it; None when detached already).
    An interrupted purge's work comes first, whatever its range: PostgreSQL allows one pending
    detach per table, and while one is left every new DETACH CONCURRENTLY fails."""
    attached = catalog()
    return (
        [(name, None) for name in detached_leftovers()]
        + [(p.name, "FINALIZE") for p in attached if p.detach_pending]
        + [(p.name, "CONCURRENTLY") for p in attached if p.end <= limit and not p.detach_pending]
    )


def _purge(plan: list[tuple[str, str | None]], by: str) -> PurgeResult:
    started = timezone.now()
    result = PurgeResult()
    for name, detach in plan:
        if detach:
            _mark(name, PartitionState.DETACHING)
            if not _lock_bounded(f'ALTER TABLE "{PARENT}" DETACH PARTITION "{name}" {detach}'):
                break
        if not all(_lock_bounded(drop) for drop in _foreign_key_drops(name)):
            break
        if not _lock_bounded(f'DROP TABLE IF EXISTS "{name}"'):
            break
        _dropped(name, by)
        result.dropped.append(name)
    # After a timeout, stop: the lock holder is likely still there, the rest would wait again.
    result.postponed = [name for name, _ in plan[len(result.dropped) :]]
    if result.postponed:
        result.reason = (
            f"a lock wait for {result.postponed[0]} took over"
            f" {settings.VARIABLE_PURGE_LOCK_TIMEOUT_MS} ms (a long transaction on builds_build"
            f" or {PARENT}); the next purge will finish"
        )
        log.warning(
            "variable partition purge by %s postponed %s: %s",
            by, ", ".join(result.postponed), result.reason,
        )  # fmt: skip
    if plan:
        metrics.PURGE_SECONDS.observe((timezone.now() - started).total_seconds())
    reconcile()
    return result


def _foreign_key_drops(name: str) -> list[str]:
    """The ALTER TABLE statements dropping a detached partition's foreign keys, if it is
    still there."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'f'",
            [f'"{name}"'],
        )
        keys = [row[0] for row in cursor.fetchall()]
    quote = connection.ops.quote_name
    return [f"ALTER TABLE {quote(name)} DROP CONSTRAINT {quote(key)}" for key in keys]


def _lock_bounded(sql: str, params=None) -> bool:
    """Run a CREATE, DETACH or DROP under the purge's lock_timeout (see the module's
    docstring). False when a lock wait timed out: the statement stopped where it was (a
    concurrent detach may be left pending, a detached table left behind) and the next run
    finishes it."""
    timeout = f"{settings.VARIABLE_PURGE_LOCK_TIMEOUT_MS}ms"
    with connection.cursor() as cursor:
        # A session setting: SET LOCAL needs a transaction, which DETACH CONCURRENTLY refuses.
        cursor.execute("SELECT set_config('lock_timeout', %s, false)", [timeout])
        try:
            cursor.execute(sql, params)
        except OperationalError as exc:
            if getattr(exc.__cause__, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            return False
        finally:
            cursor.execute("RESET lock_timeout")
    return True


def _dropped(name: str, by: str) -> None:
    VariablePartition.objects.filter(name=name).update(
        state=PartitionState.DROPPED, dropped_at=timezone.now(), dropped_by=by
    )
    log.info("variable partition %s dropped by %s", name, by)
    audit.record("partition.drop", VariablePartition.objects.filter(name=name).first)


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
