import time

from django.core.management.base import BaseCommand, CommandError

import audit
from builds import services
from builds.definition import parse_assignments
from builds.errors import PipelineNotFound
from builds.models import Build, Pipeline
from builds.statuses import BUILD_FINAL, BuildStatus
from ciproject.commands import reporting_errors
from ciproject.services_check import require_services


class Command(BaseCommand):
    help = "Trigger a build of the pipeline NAME; with --wait, wait for its end."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--var", action="append", default=[], metavar="K=V")
        parser.add_argument(
            "--idempotency-key",
            default="",
            help="run again with the same key, the command reports the build the first run"
            " made instead of making another",
        )
        parser.add_argument(
            "--priority",
            type=int,
            default=None,
            help="its place in its concurrency group's queue, higher first (up to the"
            " pipeline's max-priority; default: the pipeline's priority)",
        )
        parser.add_argument("--wait", action="store_true", help="wait for the final status")
        parser.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")

    def handle(self, *args, name, var, idempotency_key, priority, wait, timeout, **options):
        require_services()  # one clear message naming a service that is down
        with reporting_errors(), audit.acting_as(via="cli"):  # the operator, in the trail
            pipeline = Pipeline.objects.filter(name=name).first()
            if pipeline is None:
                raise PipelineNotFound(f"there is no pipeline named {name!r}")
            variables = parse_assignments(
                (("--var", text) for text in var),
                unreadable="{place} {text!r}: expected KEY=VALUE",
                twice="{place} {name} given twice",
            )
            build, replayed = services.trigger(
                pipeline, variables, idempotency_key=idempotency_key, priority=priority
            )
        earlier = " (made earlier with this idempotency key)" if replayed else ""
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
