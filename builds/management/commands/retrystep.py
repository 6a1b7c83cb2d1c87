from django.core.management.base import BaseCommand

import audit
from builds import services
from ciproject.commands import reporting_errors
from ciproject.services_check import require_services


class Command(BaseCommand):
    help = "Retry a FAILED, TIMED_OUT or CANCELED step of a build, then the rest of the build."

    def add_arguments(self, parser):
        parser.add_argument("build_id", type=int)
        parser.add_argument("step_id", type=int)

    def handle(self, *args, build_id, step_id, **options):
        require_services()  # one clear message naming a service that is down
        with reporting_errors(), audit.acting_as(via="cli"):  # the operator, in the trail
            step = services.retry_step(build_id, step_id)
        self.stdout.write(f"step {step.name!r} attempt {step.attempt}: {step.status}")
