"""Each door to the token service: the API, the admin, createtoken and ensureadmin."""

import re
from datetime import timedelta
from io import StringIO

import pytest
import time_machine
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from builds import services as builds
from tests.support import PARALLEL, api_token, user_with
from tokens.models import ApiToken, Kind

pytestmark = pytest.mark.django_db


def signed_in(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_the_api_lists_ones_own_and_staff_everyones_with_all():
    alice, bob = user_with(), user_with()
    staff = User.objects.create_user("ops", is_staff=True)
    api_token(alice, name="a")
    api_token(bob, name="b")

    def names(client, query=""):
        return [t["name"] for t in client.get(f"/api/tokens/{query}").json()["results"]]

    assert names(signed_in(alice)) == ["a"]
    assert names(signed_in(alice), "?all=1") == ["a"]  # not staff: still one's own
    assert names(signed_in(staff)) == []
    assert sorted(names(signed_in(staff), "?all=1")) == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "x", "days": 366}, 400, "INVALID_TOKEN"),
        ({"name": "x", "days": 0}, 400, "INVALID_TOKEN"),
        ({"name": "x", "actions": ["delete"]}, 400, "INVALID_REQUEST"),
        ({"name": "x", "pipelines": [999999]}, 400, "INVALID_TOKEN"),
        ({"name": "taken"}, 409, "TOKEN_NAME_TAKEN"),
        ({"name": "svc", "kind": "service", "owner": "ops"}, 403, "PERMISSION_DENIED"),
    ],
)
def test_the_api_refuses_a_bad_token_request(body, status, code):
    user = user_with()
    api_token(user, name="taken")
    answer = signed_in(user).post("/api/tokens/", body, format="json")
    assert (answer.status_code, answer.json()["code"]) == (status, code)
    assert user.api_tokens.count() == 1


def test_a_new_token_defaults_to_read_for_90_days_and_staff_make_service_tokens(settings):
    user = user_with()
    with time_machine.travel(timezone.now(), tick=False):
        made = signed_in(user).post("/api/tokens/", {"name": "laptop"}, format="json").json()
    token = ApiToken.objects.get(pk=made["id"])
    assert token.actions == ["read"]
    assert token.kind == Kind.PERSONAL
    assert token.expiry - token.created == timedelta(days=settings.API_TOKEN_DEFAULT_DAYS)
    bot = User.objects.create_user("deploy-bot")
    staff = signed_in(User.objects.create_user("ops", is_staff=True))
    body = {"name": "deploy", "kind": "service", "owner": "deploy-bot", "actions": ["trigger"]}
    made = staff.post("/api/tokens/", body, format="json")
    assert made.status_code == 201
    assert ApiToken.objects.get(pk=made.json()["id"]).user == bot


def test_rotate_keeps_the_name_and_scope_and_revokes_the_old():
    web = builds.save_pipeline("web", PARALLEL)
    user = user_with()
    api_token(user, name="ci", actions=["trigger"], pipelines=[web.pk])
    old = ApiToken.objects.get()
    answer = signed_in(user).post(f"/api/tokens/{old.pk}/rotate/", {"days": 7}, format="json")
    assert answer.status_code == 201
    new = ApiToken.objects.get(pk=answer.json()["id"])
    assert (new.name, new.actions, new.pipeline_ids()) == ("ci", ["read", "trigger"], {web.pk})
    old.refresh_from_db()
    assert old.revoked_at is not None
    assert new.revoked_at is None


def test_the_admin_shows_the_value_once_and_revokes():
    user = User.objects.create_user("ops", is_staff=True)
    client = Client()
    client.force_login(user)
    form = {"owner": user.pk, "name": "admin-made", "kind": "personal", "actions": ["cancel"]}
    page = client.post("/admin/tokens/apitoken/add/", form)
    assert page.status_code == 200
    value = re.search(r'<code id="token-value">(cip_\w+)</code>', page.text).group(1)
    assert "no-store" in page["Cache-Control"]
    token = ApiToken.objects.get()
    assert token.actions == ["read", "cancel"]
    listing = client.get("/admin/tokens/apitoken/")
    assert token.token_key in listing.text
    assert value[15:] not in listing.text
    assert value[15:] not in client.get(f"/admin/tokens/apitoken/{token.pk}/change/").text
    revoke = {"action": "revoke", "_selected_action": [token.pk], "index": "0"}
    assert client.post("/admin/tokens/apitoken/", revoke).status_code == 302
    token.refresh_from_db()
    assert token.revoked_by == user


def test_the_admin_shows_staff_their_own_tokens_unless_they_may_view_all():
    ops, other = (User.objects.create_user(n, is_staff=True) for n in ("ops", "other"))
    api_token(other, name="not-yours")
    client = Client()
    client.force_login(ops)
    assert "not-yours" not in client.get("/admin/tokens/apitoken/").text
    token = ApiToken.objects.get()
    assert client.get(f"/admin/tokens/apitoken/{token.pk}/change/").status_code == 302
    ops.user_permissions.add(Permission.objects.get(codename="view_apitoken"))
    assert "not-yours" in client.get("/admin/tokens/apitoken/").text


def test_createtoken_prints_the_value_once_and_makes_service_accounts():
    web = builds.save_pipeline("web", PARALLEL)
    out, err = StringIO(), StringIO()
    call_command(
        "createtoken", "--user", "ci-bot", "--name", "ci", "--days", "30",
        "--actions", "read,trigger", "--pipeline", str(web.pk), "--service",
        stdout=out, stderr=err,
    )  # fmt: skip
    value = out.getvalue().strip()
    token = ApiToken.objects.get()
    assert token.token_key == value[:15]
    assert value not in err.getvalue()
    assert (token.kind, token.actions) == ("service", ["read", "trigger"])
    assert token.pipeline_ids() == {web.pk}
    assert not token.user.has_usable_password()
    with pytest.raises(CommandError, match="TOKEN_NAME_TAKEN"):
        call_command("createtoken", "--user", "ci-bot", "--name", "ci", stdout=out)
    with pytest.raises(CommandError, match="no user"):
        call_command("createtoken", "--user", "nobody", "--name", "ci", stdout=out)


def test_ensureadmin_prints_a_working_token_and_rotates_it_each_run():
    values = []
    for _ in range(2):
        out = StringIO()
        call_command("ensureadmin", "--username", "root", "--password", "pw", stdout=out)
        values.append(re.search(r"^API token: (\w+)", out.getvalue(), re.MULTILINE).group(1))
    first, second = (APIClient() for _ in range(2))
    first.credentials(HTTP_AUTHORIZATION=f"Token {values[0]}")
    second.credentials(HTTP_AUTHORIZATION=f"Token {values[1]}")
    assert first.get("/api/builds/").json()["code"] == "TOKEN_REVOKED"
    assert second.get("/api/builds/").status_code == 200


def test_drf_create_token_refuses_to_store_a_plain_key():
    user_with()
    with pytest.raises(CommandError, match="createtoken"):
        call_command("drf_create_token", "user0")
