from django.core.management.base import BaseCommand, CommandError

from builds import services
from builds.models import Build
from ciproject.errors import CIError
from ciproject.services_check import require_services


class Command(BaseCommand):
    help = "Cancel a build: it answers CANCELLING at once and ends CANCELED."

    def add_arguments(self, parser):
        parser.add_argument("build_id", type=int)

    def handle(self, *args, build_id, **options):
        require_services()  # one clear message naming a service that is down
        if not Build.objects.filter(pk=build_id).exists():
            raise CommandError(f"BUILD_NOT_FOUND: there is no build with id {build_id}")
        try:
            status = services.request_cancel(build_id)
        except CIError as exc:
            raise CommandError(f"{exc.code}: {exc.detail}") from None
        self.stdout.write(status)
