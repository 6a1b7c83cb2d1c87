"""Expiry and revocation take effect on the very next request; the last use is recorded at
most once a minute; a malformed header is a 401, never a 500."""

from datetime import timedelta

import pytest
import time_machine
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from access.models import Membership, Role, Team
from tests.support import api_token, make_pipeline, one_step, user_with
from tokens import services
from tokens.models import ApiToken

pytestmark = pytest.mark.django_db


def client_with(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {value}")
    return client


def test_an_expired_token_is_refused_on_the_next_request():
    value = api_token(user_with("builds.view_build"), days=1)
    client = client_with(value)
    expiry = ApiToken.objects.get().expiry
    with time_machine.travel(expiry - timedelta(seconds=1), tick=False):
        assert client.get("/api/builds/").status_code == 200
    with time_machine.travel(expiry, tick=False):
        refused = client.get("/api/builds/")
    assert refused.status_code == 401
    assert refused.json()["code"] == "TOKEN_EXPIRED"
    assert refused["WWW-Authenticate"] == "Token"
    assert ApiToken.objects.count() == 1  # kept, not deleted (as knox would)


def test_a_revoked_token_is_refused_on_the_next_request():
    owner = user_with("builds.view_build")
    value = api_token(owner)
    client = client_with(value)
    assert client.get("/api/builds/").status_code == 200
    token = ApiToken.objects.get()
    assert client.delete(f"/api/tokens/{token.pk}/").status_code == 204  # revokes itself
    refused = client.get("/api/builds/")
    assert refused.status_code == 401
    assert refused.json()["code"] == "TOKEN_REVOKED"
    token.refresh_from_db()
    assert token.revoked_by == owner
    assert token.revoked_at is not None


def test_staff_revoke_anyones_token_and_others_cannot():
    value = api_token(user_with("builds.view_build"))
    token = ApiToken.objects.get()
    stranger = APIClient()
    stranger.force_authenticate(user_with())
    assert stranger.delete(f"/api/tokens/{token.pk}/").status_code == 404
    assert client_with(value).get("/api/builds/").status_code == 200
    staff = APIClient()
    staff.force_authenticate(User.objects.create_user("ops", is_staff=True))
    assert staff.delete(f"/api/tokens/{token.pk}/").status_code == 204
    assert client_with(value).get("/api/builds/").json()["code"] == "TOKEN_REVOKED"
    again = staff.delete(f"/api/tokens/{token.pk}/")
    assert (again.status_code, again.json()["code"]) == (409, "TOKEN_ALREADY_REVOKED")


def test_last_use_is_written_at_most_once_a_minute():
    client = client_with(api_token(user_with("builds.view_build")))
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        client.get("/api/builds/")
    assert ApiToken.objects.get().last_used_at == start
    with (
        time_machine.travel(start + timedelta(seconds=59), tick=False),
        CaptureQueriesContext(connection) as queries,
    ):
        assert client.get("/api/builds/").status_code == 200
    assert not [q for q in queries if q["sql"].startswith("UPDATE")]
    assert ApiToken.objects.get().last_used_at == start
    with time_machine.travel(start + timedelta(seconds=61), tick=False):
        client.get("/api/builds/")
    assert ApiToken.objects.get().last_used_at == start + timedelta(seconds=61)


@pytest.mark.parametrize(
    "header",
    ["Token", "Token a b", "Token nope", "Token cip_" + "0" * 64, "Token \u00e9t\u00e9"],
)
def test_a_wrong_or_malformed_token_is_a_401(header):
    api_token(user_with())
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header.encode().decode("latin-1"))
    answer = client.get("/api/builds/")
    assert answer.status_code == 401
    assert answer.json()["code"] == "AUTHENTICATION_FAILED"


def test_an_inactive_owners_token_is_refused():
    owner = user_with("builds.view_build")
    client = client_with(api_token(owner))
    User.objects.filter(pk=owner.pk).update(is_active=False)
    assert client.get("/api/builds/").status_code == 401


def test_the_user_carries_its_token_for_the_access_rules():
    """access.rules.may(user, ...) asks user.api_token: the token, or None for a session."""
    from rest_framework.request import Request
    from rest_framework.test import APIRequestFactory

    from tokens.authentication import ApiTokenAuthentication

    value = api_token(user_with(), actions=["read", "cancel"])
    request = Request(APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"Token {value}"))
    user, token = ApiTokenAuthentication().authenticate(request)
    assert user.api_token is token
    assert token.allows("cancel")
    assert not token.allows("trigger")
    services.revoke_token(token, user)
    assert not token.allows("read")


def test_a_tokens_user_is_decided_by_the_memberships_read_with_it():
    """The token's statement brings its owner's memberships, and the pipeline is read with
    its teams: the role is decided without a query of its own, and a role changed between two
    requests holds on the second."""
    pipeline = make_pipeline("roles", one_step("true"))
    team = Team.objects.create(name="roles")
    team.pipelines.add(pipeline)
    owner = User.objects.create_user("dev")
    membership = Membership.objects.create(team=team, user=owner, role=Role.DEVELOPER)
    client = client_with(api_token(owner))
    path = f"/api/pipelines/{pipeline.pk}/builds/"
    with CaptureQueriesContext(connection) as queries:
        assert client.post(path, {}, format="json").status_code == 201
    asked = [q["sql"] for q in queries if "access_membership" in q["sql"]]
    assert len(asked) == 1, asked
    assert "FROM tokens_apitoken" in asked[0]
    Membership.objects.filter(pk=membership.pk).update(role=Role.VIEWER)
    refused = client.post(path, {}, format="json")
    assert refused.status_code == 403, refused.content
    membership.delete()
    assert client.post(path, {}, format="json").status_code == 404  # sees it no more
