"""The migration path: a DRF authtoken key made before tokens.0002 still authenticates after
it, as the owner's token "legacy" (every action, no expiry), and the plain key is gone."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from rest_framework.test import APIClient

from tests.support import user_with
from tokens.models import ACTIONS, ApiToken

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("tokens", "0001_initial"), ("authtoken", "0004_alter_tokenproxy_options")]
AFTER = [("tokens", "0002_legacy_keys")]
KEY = "0123456789abcdef0123456789abcdef01234567"  # DRF's shape: 40 hex digits


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def test_a_legacy_key_authenticates_after_the_migration_and_is_gone_in_plain():
    owner = user_with("builds.view_build")
    old = migrate(BEFORE)
    old.get_model("authtoken", "Token").objects.create(key=KEY, user_id=owner.pk)
    try:
        migrate(AFTER)
    finally:
        migrate(AFTER)  # the later tests' state, whatever happened
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM authtoken_token")
        assert cursor.fetchone() == (0,)
        cursor.execute("SELECT * FROM tokens_apitoken")
        assert all(KEY not in str(cell) for row in cursor.fetchall() for cell in row)
    token = ApiToken.objects.get()
    assert (token.user, token.name, token.legacy, token.expiry) == (owner, "legacy", True, None)
    assert token.actions == list(ACTIONS)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {KEY}")
    assert client.get("/api/builds/").status_code == 200
    # Rotated, it becomes an ordinary token that expires; the old key stops at once.
    rotated = client.post(f"/api/tokens/{token.pk}/rotate/", {}, format="json")
    assert rotated.status_code == 201
    assert rotated.json()["expiry"] is not None
    assert rotated.json()["legacy"] is False
    assert client.get("/api/builds/").json()["code"] == "TOKEN_REVOKED"
    client.credentials(HTTP_AUTHORIZATION=f"Token {rotated.json()['token']}")
    assert client.get("/api/builds/").status_code == 200
