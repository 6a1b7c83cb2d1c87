"""Purging events older than AUDIT_RETENTION_DAYS (0: kept for ever), by beat hourly and
`manage.py audit purge`. In batches, each its own short DELETE, so a purge of a year's
backlog never holds many rows locked nor one long transaction (nothing else writes old
events, so nobody waits on it anyway)."""

from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from audit.models import AuditEvent

BATCH = 1000


def cutoff(now=None):
    """Events before this are purged; None when they are kept for ever."""
    days = settings.AUDIT_RETENTION_DAYS
    return (now or timezone.now()) - timedelta(days=days) if days > 0 else None


def purge(now=None, batch: int = BATCH, dry_run: bool = False) -> int:
    """How many events were purged (or, dry, would be)."""
    limit = cutoff(now)
    if limit is None:
        return 0
    if dry_run:
        return AuditEvent.objects.filter(at__lt=limit).count()
    table = AuditEvent._meta.db_table
    purged = 0
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE at < %s LIMIT %s)",
                [limit, batch],
            )
            purged += cursor.rowcount
            if cursor.rowcount < batch:
                return purged
