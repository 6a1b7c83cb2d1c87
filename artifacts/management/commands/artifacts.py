from django.core.management.base import BaseCommand

from artifacts import services
from ciproject.services_check import check_database
from ciproject.sizes import format_size


class Command(BaseCommand):
    help = (
        "Artifacts: `expire [--dry-run]` deletes the files of the artifacts past their expiry"
        " (beat does it hourly) and says what it freed; --dry-run says what it would free."
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        expire = actions.add_parser("expire")
        expire.add_argument("--dry-run", action="store_true")

    def handle(self, *args, action, dry_run=False, **options):
        check_database()  # one clear message naming a service that is down
        freed = services.expire(dry_run=dry_run)
        verb = "would free" if dry_run else "freed"
        self.stdout.write(f"{verb} {freed.files} artifacts, {format_size(freed.bytes)}")
