from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Replaced by createtoken: DRF's keys were stored in plain text and are read no more."

    def add_arguments(self, parser):
        parser.add_argument("args", nargs="*")

    def handle(self, *args, **options):
        raise CommandError(
            "API tokens are hashed now: manage.py createtoken --user USER --name NAME"
            " (README: Tokens); drf_create_token's keys would be stored in plain text and"
            " never accepted"
        )
