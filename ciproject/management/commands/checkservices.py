from django.core.management.base import BaseCommand

from ciproject.services_check import require_services


class Command(BaseCommand):
    help = "Check that PostgreSQL and the Celery broker answer; name the one that does not."

    def add_arguments(self, parser):
        parser.add_argument(
            "--create-database", action="store_true", help="create the database if it is missing"
        )

    def handle(self, *args, create_database, **options):
        require_services(create_database=create_database)
        self.stdout.write("PostgreSQL and the broker are reachable.")
