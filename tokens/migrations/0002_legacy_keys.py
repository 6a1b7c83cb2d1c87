"""Every DRF authtoken key becomes an ApiToken, hashed as new tokens are: its owner's token
"legacy", with every action and no expiry, so clients holding it keep working until it is
rotated (README: Tokens). The plain keys are then deleted from authtoken_token.

Irreversible in substance: going back leaves the hashed tokens and cannot restore a plain
key (nothing knows them any more)."""

from django.db import migrations
from knox.crypto import hash_token

ACTIONS = ["read", "trigger", "cancel", "retry", "edit", "staff"]  # tokens.models.ACTIONS then
PREFIX_LENGTH = 15  # knox's TOKEN_KEY_LENGTH: what the authentication looks a token up by


def move_keys(apps, schema_editor):
    Token = apps.get_model("authtoken", "Token")
    ApiToken = apps.get_model("tokens", "ApiToken")
    for key, user_id, created in Token.objects.values_list("key", "user_id", "created"):
        token = ApiToken.objects.create(
            user_id=user_id,
            name="legacy",
            kind="personal",
            actions=ACTIONS,
            legacy=True,
            digest=hash_token(key),
            token_key=key[:PREFIX_LENGTH],
            expiry=None,
        )
        ApiToken.objects.filter(pk=token.pk).update(created=created)  # auto_now_add: its own
    Token.objects.all().delete()


class Migration(migrations.Migration):
    dependencies = [
        ("tokens", "0001_initial"),
        ("authtoken", "0004_alter_tokenproxy_options"),
    ]

    operations = [migrations.RunPython(move_keys, migrations.RunPython.noop)]
