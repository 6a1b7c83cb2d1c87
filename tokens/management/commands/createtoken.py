from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

import audit
from ciproject.commands import reporting_errors
from tokens import services
from tokens.models import ACTIONS, Kind


class Command(BaseCommand):
    help = (
        "Make an API token and print its value, once (nothing can show it again). --service"
        " makes a service token, and the service account user (no password, so no admin"
        " sign-in) if it is missing."
    )

    def add_arguments(self, parser):
        parser.add_argument("--user", required=True, help="the owner's username")
        parser.add_argument("--name", required=True, help="unique among the owner's tokens")
        parser.add_argument("--days", type=int, help="its lifetime (API_TOKEN_DEFAULT_DAYS)")
        parser.add_argument(
            "--actions", default="read", help=f"comma-separated, of {','.join(ACTIONS)}"
        )
        parser.add_argument(
            "--pipeline", type=int, action="append", default=[], help="limit to it (repeatable)"
        )
        parser.add_argument("--service", action="store_true", help="a service account's token")

    def handle(self, *args, user, name, days, actions, pipeline, service, **options):
        users = get_user_model().objects
        owner = users.filter(username=user).first()
        if owner is None and service:
            owner = users.create_user(user)  # create_user with no password: unusable
        if owner is None:
            raise CommandError(f"no user {user!r} (--service makes a service account)")
        with reporting_errors(), audit.acting_as(via="cli"):  # the operator, in the trail
            token, value = services.create_token(
                owner,
                name,
                actions=[a.strip() for a in actions.split(",") if a.strip()],
                days=days,
                pipelines=pipeline,
                kind=Kind.SERVICE if service else Kind.PERSONAL,
            )
        where = ", ".join(map(str, sorted(pipeline))) or "every pipeline"
        self.stderr.write(
            f"token {token.name!r} of {owner}: {', '.join(token.actions)} on {where},"
            f" until {token.expiry:%Y-%m-%d %H:%M} UTC; its value, shown this once:"
        )
        self.stdout.write(value)
