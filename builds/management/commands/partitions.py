from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError

from builds import partitions


def parse_date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"--before {text!r}: expected a date such as 2026-08-01") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Upkeep of the build-variable partitions: `ensure` creates them ahead, `purge` drops "
        "those wholly older than the retention (or than --before) without blocking writers."
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        ensure = sub.add_parser("ensure", help="create the current and the next partitions")
        ensure.add_argument("--ahead", type=int, default=None)
        purge = sub.add_parser("purge", help="drop expired partitions")
        purge.add_argument("--dry-run", action="store_true", help="print, change nothing")
        purge.add_argument("--before", type=parse_date, help="drop partitions ending by DATE")

    def handle(self, *args, action, **options):
        if action == "ensure":
            created = partitions.ensure(ahead=options["ahead"])
            self.stdout.write(f"created {len(created)} partition(s)")
            for name in created:
                self.stdout.write(f"  {name}")
            return
        dry_run = options["dry_run"]
        names = partitions.purge(before=options["before"], dry_run=dry_run, by="manage.py")
        verb = "would drop" if dry_run else "dropped"
        self.stdout.write(f"{verb} {len(names)} partition(s)")
        for name in names:
            self.stdout.write(f"  {name}")
