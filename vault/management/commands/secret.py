import sys

from django.core.management.base import BaseCommand, CommandError

import audit
from builds.models import Pipeline
from ciproject.commands import reporting_errors
from ciproject.services_check import require_services
from vault import services
from vault.models import SecretScope


class Command(BaseCommand):
    help = (
        "Pipeline secrets: `set PIPELINE NAME` (the value from stdin, never an argument: it"
        " would be in the shell's history and in ps), `delete PIPELINE NAME`, `list PIPELINE`"
        " (names only), `rotate` (re-encrypt every value under the first key). --scope SCOPE"
        " instead of a pipeline for a shared scope's secrets."
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        for action in ("set", "delete", "list"):
            sub = actions.add_parser(action)
            sub.add_argument("--scope", help="a shared scope, instead of a pipeline")
            sub.add_argument("pipeline", nargs="?", help="the pipeline's name")
            if action != "list":
                sub.add_argument("name")
        actions.add_parser("rotate")

    def handle(self, *args, action, **options):
        require_services()
        with reporting_errors(), audit.acting_as(via="cli"):  # the operator, in the trail
            if action == "rotate":
                count = services.rotate_all()
                self.stdout.write(f"{count} secrets re-encrypted under the first key")
                return
            owner = self._owner(options["pipeline"], options["scope"])
            if action == "list":
                for name in services.names_of(owner):
                    self.stdout.write(name)
            elif action == "delete":
                services.delete_secret(owner, options["name"], source="cli")
                self.stdout.write(f"secret {options['name']} deleted")
            else:
                value = sys.stdin.read()
                value = value[:-1] if value.endswith("\n") else value  # echo's newline
                replaced = services.set_secret(owner, options["name"], value, source="cli")
                self.stdout.write(f"secret {options['name']} {'replaced' if replaced else 'set'}")

    def _owner(self, pipeline: str | None, scope: str | None):
        if bool(pipeline) == bool(scope):
            raise CommandError("name a pipeline, or a --scope, not both")
        if scope:
            found = SecretScope.objects.filter(name=scope).first()
        else:
            found = Pipeline.objects.filter(name=pipeline).first()
        if found is None:
            raise CommandError(f"no {'scope' if scope else 'pipeline'} named {scope or pipeline!r}")
        return found
