from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

import audit
from tokens import services


class Command(BaseCommand):
    help = (
        "Create (or reset) a superuser and print its credentials and an API token: its token"
        " 'ensureadmin', made anew each run (only a token's digest is stored, so the old value"
        " cannot be printed again; the previous one is revoked)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password", default="admin")

    def handle(self, *args, username, password, **options):
        user, created = get_user_model().objects.get_or_create(username=username)
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        with audit.acting_as(via="cli"):  # the operator, in the trail
            token, value = services.issue_token(user, "ensureadmin")
        verb = "created" if created else "updated"
        self.stdout.write(f"admin user {verb}: username {username!r}, password {password!r}")
        self.stdout.write(
            f"API token: {value}  (header 'Authorization: Token {value}';"
            f" until {token.expiry:%Y-%m-%d})"
        )
