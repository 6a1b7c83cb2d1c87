import time

from django.core.management.base import BaseCommand, CommandError

from builds import services
from builds.models import Build, Pipeline
from builds.statuses import BUILD_FINAL, BuildStatus
from ciproject.errors import CIError
from ciproject.services_check import require_services


def parse_var(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise CommandError(f"--var {text!r}: expected KEY=VALUE")
    return name, value


class Command(BaseCommand):
    help = "Trigger a build of the pipeline NAME; with --wait, wait for its end."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--var", action="append", default=[], type=parse_var, metavar="K=V")
        parser.add_argument(
            "--idempotency-key",
            default="",
            help="run again with the same key, the command reports the build the first run"
            " made instead of making another",
        )
        parser.add_argument("--wait", action="store_true", help="wait for the final status")
        parser.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")

    def handle(self, *args, name, var, idempotency_key, wait, timeout, **options):
        require_services()  # one clear message naming a service that is down
        pipeline = Pipeline.objects.filter(name=name).first()
        if pipeline is None:
            raise CommandError(f"PIPELINE_NOT_FOUND: there is no pipeline named {name!r}")
        names = [name for name, _ in var]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            # As in the admin: refused, rather than silently keeping the last value.
            raise CommandError(f"INVALID_VARIABLES: --var {', '.join(twice)} given twice")
        try:
            build = services.trigger_build(pipeline, dict(var), idempotency_key=idempotency_key)
        except CIError as exc:
            raise CommandError(f"{exc.code}: {exc.detail}") from None
        earlier = " (made earlier with this idempotency key)" if build.replayed else ""
        self.stdout.write(f"build #{build.number} (id {build.pk}) {build.status}{earlier}")
        if not wait:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := Build.objects.values_list("status", flat=True).get(pk=build.pk)) not in (
            BUILD_FINAL
        ):
            if deadline and time.monotonic() > deadline:
                raise CommandError(f"build #{build.number} still {status} after {timeout} s")
            time.sleep(0.2)
        self.stdout.write(status)
        if status != BuildStatus.SUCCEEDED:
            raise CommandError(f"build #{build.number} ended {status}", returncode=1)
