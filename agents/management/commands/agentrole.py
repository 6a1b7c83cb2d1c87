import os

from django.core.management.base import BaseCommand, CommandError

from agents import database_role


class Command(BaseCommand):
    help = (
        "Create (or reset) the PostgreSQL role build agents connect as, with exactly the"
        " privileges they need (agents.database_role). The password is read from the"
        " environment variable named by --password-env, never from the command line."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="the role, e.g. ciagent")
        parser.add_argument("--password-env", default="AGENT_DB_PASSWORD")

    def handle(self, *args, name, password_env, **options):
        password = os.environ.get(password_env, "")
        if not password:
            raise CommandError(
                f"set the role's password in the environment variable {password_env}"
            )
        database_role.ensure_role(name, password)
        tables = ", ".join(database_role.tables())
        self.stdout.write(f"role {name}: may log in; privileges on {tables} only")
