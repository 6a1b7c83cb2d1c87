from django.core.management.base import BaseCommand

import audit
from builds import services
from ciproject.commands import reporting_errors
from ciproject.services_check import require_services


class Command(BaseCommand):
    help = "Cancel a build: it answers CANCELLING at once and ends CANCELED."

    def add_arguments(self, parser):
        parser.add_argument("build_id", type=int)

    def handle(self, *args, build_id, **options):
        require_services()  # one clear message naming a service that is down
        with reporting_errors(), audit.acting_as(via="cli"):  # the operator, in the trail
            status = services.request_cancel(build_id)
        self.stdout.write(status)
