from django.core.management.base import BaseCommand

from audit import retention
from ciproject.services_check import require_services


class Command(BaseCommand):
    help = (
        "The audit trail: `purge [--dry-run]` deletes the events older than"
        " AUDIT_RETENTION_DAYS now (beat does it hourly), in batches."
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        purge = actions.add_parser("purge")
        purge.add_argument("--dry-run", action="store_true", help="count them, delete nothing")
        purge.add_argument("--batch", type=int, default=retention.BATCH, help="rows a DELETE")

    def handle(self, *args, action, dry_run, batch, **options):
        require_services()
        limit = retention.cutoff()
        if limit is None:
            self.stdout.write("AUDIT_RETENTION_DAYS=0: events are kept for ever")
            return
        count = retention.purge(batch=max(batch, 1), dry_run=dry_run)
        verb = "would purge" if dry_run else "purged"
        self.stdout.write(f"{verb} {count} audit events before {limit:%Y-%m-%d %H:%M} UTC")
