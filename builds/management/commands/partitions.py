from argparse import ArgumentTypeError
from datetime import UTC, datetime

from django.core.management.base import BaseCommand

import audit
from builds import partitions
from ciproject.commands import reporting_errors
from ciproject.services_check import check_database


def parse_date(text: str) -> datetime:
    # ArgumentTypeError, not CommandError: argparse turns it into a usage error, whereas a
    # CommandError raised while parsing escapes run_from_argv as a traceback.
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ArgumentTypeError(f"{text!r} is not a date such as 2026-08-01") from None
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
        purge.add_argument(
            "--before",
            type=parse_date,
            metavar="DATE",
            help="drop only the partitions ending by DATE (ISO 8601, UTC unless it says), to"
            " purge less than the retention would; a DATE later than the retention cutoff"
            " (now - VARIABLE_RETENTION_DAYS) is refused with PURGE_BEFORE_TOO_LATE",
        )

    def handle(self, *args, action, **options):
        check_database()  # one clear message naming a service that is down
        with audit.acting_as(via="cli"):  # the operator, in the trail
            self._act(action, options)

    def _act(self, action, options):
        if action == "ensure":
            created = partitions.ensure(ahead=options["ahead"])
            self.stdout.write(f"created {len(created)} partition(s)")
            for name in created:
                self.stdout.write(f"  {name}")
            return
        dry_run = options["dry_run"]
        with reporting_errors():
            result = partitions.purge(before=options["before"], dry_run=dry_run, by="manage.py")
        verb = "would drop" if dry_run else "dropped"
        self.stdout.write(f"{verb} {len(result.dropped)} partition(s)")
        for name in result.dropped:
            self.stdout.write(f"  {name}")
        if result.reason:
            self.stdout.write(f"stopped: {result.reason}")
            for name in result.postponed:
                self.stdout.write(f"  left for the next run: {name}")
