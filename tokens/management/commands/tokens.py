from django.core.management.base import BaseCommand

from ciproject.services_check import require_services
from tokens import retention


class Command(BaseCommand):
    help = (
        "API tokens: `purge [--dry-run]` deletes the tokens revoked or expired more than"
        " API_TOKEN_KEEP_DAYS ago now (beat does it hourly), in batches."
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
            self.stdout.write("API_TOKEN_KEEP_DAYS=0: dead tokens are kept for ever")
            return
        count = retention.purge(batch=max(batch, 1), dry_run=dry_run)
        verb = "would purge" if dry_run else "purged"
        self.stdout.write(
            f"{verb} {count} tokens revoked or expired before {limit:%Y-%m-%d %H:%M} UTC"
        )
