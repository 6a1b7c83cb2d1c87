from django.core.management.base import BaseCommand

import audit
from builds import services
from ciproject.commands import reporting_errors
from ciproject.services_check import require_services


class Command(BaseCommand):
    help = (
        "Retry a finished build: its failed and cancelled jobs and what follows them, or with"
        " --all every job (a SUCCEEDED build too)."
    )

    def add_arguments(self, parser):
        parser.add_argument("build_id", type=int)
        parser.add_argument("--all", action="store_true", help="re-run every job")

    def handle(self, *args, build_id, all, **options):
        require_services()  # one clear message naming a service that is down
        with reporting_errors(), audit.acting_as(via="cli"):  # the operator, in the trail
            build = services.retry_build(build_id, failed_only=not all)
        self.stdout.write(f"build #{build.number} attempt {build.attempt}: {build.status}")
