from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

import audit
from builds import services
from builds.models import Pipeline
from ciproject.commands import reporting_errors
from ciproject.services_check import check_database


class Command(BaseCommand):
    help = "Create or update the pipeline NAME from a YAML file."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("file", type=Path)

    def handle(self, *args, name, file, **options):
        check_database()  # one clear message naming a service that is down
        try:
            definition = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"{file}: cannot be read: {exc}") from None
        existing = Pipeline.objects.filter(name=name).first()
        with reporting_errors(), audit.acting_as(via="cli"):  # the operator, in the trail
            pipeline = services.save_pipeline(name, definition, pipeline=existing)
        verb = "updated" if existing else "created"
        self.stdout.write(f"pipeline {pipeline.name!r} {verb} (id {pipeline.pk})")
