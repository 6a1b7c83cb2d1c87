from django.core.management.base import BaseCommand, CommandError

from builds import services
from ciproject.errors import CIError
from ciproject.services_check import require_services


class Command(BaseCommand):
    help = "Retry a FAILED, TIMED_OUT or CANCELED step of a build, then the rest of the build."

    def add_arguments(self, parser):
        parser.add_argument("build_id", type=int)
        parser.add_argument("step_id", type=int)

    def handle(self, *args, build_id, step_id, **options):
        require_services()  # one clear message naming a service that is down
        try:
            step = services.retry_step(build_id, step_id)
        except CIError as exc:
            raise CommandError(f"{exc.code}: {exc.detail}") from None
        self.stdout.write(f"step {step.name!r} attempt {step.attempt}: {step.status}")
