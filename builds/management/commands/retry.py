from django.core.management.base import BaseCommand, CommandError

from builds import services
from builds.models import Build
from ciproject.errors import CIError
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
        try:
            build = services.retry_build(build_id, failed_only=not all)
        except CIError as exc:
            raise CommandError(f"{exc.code}: {exc.detail}") from None
        except Build.DoesNotExist:
            raise CommandError(f"BUILD_NOT_FOUND: there is no build with id {build_id}") from None
        self.stdout.write(f"build #{build.number} attempt {build.attempt}: {build.status}")
