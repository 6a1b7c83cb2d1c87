"""Purging dead tokens: those revoked, or expired, more than API_TOKEN_KEEP_DAYS ago (0: kept
for ever), by beat hourly and `manage.py tokens purge`. Until then a dead token is answered
TOKEN_REVOKED or TOKEN_EXPIRED and shown in the admin; after, it is an unknown token. The
audit trail's events about it keep its name (they hold no reference to the row)."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from tokens.models import ApiToken

BATCH = 500


def cutoff(now=None):
    """Tokens dead before this are purged; None when they are kept for ever."""
    days = settings.API_TOKEN_KEEP_DAYS
    return (now or timezone.now()) - timedelta(days=days) if days > 0 else None


def purge(now=None, batch: int = BATCH, dry_run: bool = False) -> int:
    """How many tokens were purged (or, dry, would be). In batches, each a short transaction
    of its own (the ORM's delete, so the rows of their pipelines go with them)."""
    limit = cutoff(now)
    if limit is None:
        return 0
    dead = ApiToken.objects.filter(Q(revoked_at__lt=limit) | Q(expiry__lt=limit))
    if dry_run:
        return dead.count()
    purged = 0
    while ids := list(dead.values_list("pk", flat=True)[:batch]):
        ApiToken.objects.filter(pk__in=ids).delete()
        purged += len(ids)
    return purged
