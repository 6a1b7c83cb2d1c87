"""A token's scope: read-only tokens cannot act; each action needs its own; a token limited
to pipelines sees the others as 404 and is refused (403) acting on them; the map from API
actions to token actions covers every route."""

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from builds import services
from builds.models import Build, Pipeline
from tests.support import PARALLEL, api_token, fail_fast_job, user_with
from tokens.models import ACTIONS
from tokens.permissions import STAFF, scope_needed

pytestmark = pytest.mark.django_db

EVERY_PERM = [
    f"builds.{p}"
    for p in (
        "view_pipeline", "add_pipeline", "change_pipeline", "view_build", "add_build",
        "cancel_build", "retry_build",
    )
] + ["vault.view_secret"]  # fmt: skip


@pytest.fixture
def owner():
    return user_with(*EVERY_PERM)


def client_of(owner, **scope) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(owner, **scope)}")
    return client


def pipeline(name: str) -> Pipeline:
    return services.save_pipeline(name, PARALLEL)


def test_a_read_only_token_reads_and_cannot_trigger(owner):
    web = pipeline("web")
    client = client_of(owner, actions=["read"])
    assert client.get(f"/api/pipelines/{web.pk}/").status_code == 200
    refused = client.post(f"/api/pipelines/{web.pk}/builds/", {}, format="json")
    assert refused.status_code == 403
    assert refused.json()["code"] == "TOKEN_SCOPE"
    assert "its actions are read" in refused.json()["detail"]
    assert not Build.objects.exists()
    edit = client.patch(f"/api/pipelines/{web.pk}/", {"name": "x"}, format="json")
    assert edit.json()["code"] == "TOKEN_SCOPE"
    assert Pipeline.objects.get().name == "web"


def test_each_action_needs_its_own(owner):
    web = pipeline("web")
    trigger = client_of(owner, actions=["trigger"])
    assert trigger.post(f"/api/pipelines/{web.pk}/builds/", {}, format="json").status_code == 201
    build = Build.objects.get()
    step = fail_fast_job(build)
    assert trigger.post(f"/api/builds/{build.pk}/cancel/").json()["code"] == "TOKEN_SCOPE"
    retry = trigger.post(f"/api/builds/{build.pk}/steps/{step.pk}/retry/")
    assert retry.json()["code"] == "TOKEN_SCOPE"
    retrier = client_of(owner, actions=["retry"])
    assert retrier.post(f"/api/builds/{build.pk}/steps/{step.pk}/retry/").status_code == 202
    assert retrier.post(f"/api/builds/{build.pk}/cancel/").status_code == 403
    canceller = client_of(owner, actions=["cancel"])
    assert canceller.post(f"/api/builds/{build.pk}/cancel/").status_code == 202
    new = {"name": "new", "definition": PARALLEL}
    assert trigger.post("/api/pipelines/", new, format="json").status_code == 403
    editor = client_of(owner, actions=["edit"])
    assert editor.post("/api/pipelines/", new, format="json").status_code == 201


def test_the_token_never_adds_to_the_owners_rights():
    web = pipeline("web")
    client = client_of(user_with("builds.view_pipeline"), actions=ACTIONS)
    assert client.post(f"/api/pipelines/{web.pk}/builds/", {}, format="json").status_code == 403
    assert not Build.objects.exists()


def test_a_pipeline_limited_token_sees_others_as_404_and_may_not_act_on_them(owner):
    mine, other = pipeline("mine"), pipeline("other")
    theirs = services.trigger_build(other)
    client = client_of(owner, actions=["trigger", "cancel"], pipelines=[mine.pk])
    assert client.get(f"/api/pipelines/{mine.pk}/").status_code == 200
    assert client.get(f"/api/pipelines/{other.pk}/").status_code == 404
    assert client.get(f"/api/pipelines/{other.pk}/builds/").status_code == 404
    assert client.get(f"/api/builds/{theirs.pk}/").status_code == 404
    assert client.get(f"/api/pipelines/{mine.pk}/secrets/").status_code == 200
    assert client.get(f"/api/pipelines/{other.pk}/secrets/").status_code == 404
    listed = client.get("/api/pipelines/").json()["results"]
    assert [p["name"] for p in listed] == ["mine"]
    assert [b["id"] for b in client.get("/api/builds/").json()["results"]] == []

    refused = client.post(f"/api/pipelines/{other.pk}/builds/", {}, format="json")
    assert (refused.status_code, refused.json()["code"]) == (403, "TOKEN_SCOPE")
    assert client.post(f"/api/builds/{theirs.pk}/cancel/").status_code == 403
    assert Build.objects.get().status == "RUNNING"
    assert client.post(f"/api/pipelines/{mine.pk}/builds/", {}, format="json").status_code == 201
    assert len(client.get("/api/builds/").json()["results"]) == 1
    # Creating a pipeline is on no pipeline of its own: outside a limited token.
    new = {"name": "new", "definition": PARALLEL}
    limited_editor = client_of(owner, actions=["edit"], pipelines=[mine.pk])
    assert limited_editor.post("/api/pipelines/", new, format="json").status_code == 403


def test_allows_is_the_rule():
    from tokens.models import ApiToken

    owner = user_with()
    api_token(owner, actions=["trigger"], pipelines=[pipeline("a").pk])
    token = ApiToken.objects.get()
    (limited,) = token.pipeline_ids()
    assert token.allows("read")
    assert token.allows("read", limited)
    assert token.allows("trigger", limited)
    assert not token.allows("trigger", limited + 1)
    assert not token.allows("trigger")  # no pipeline in particular
    assert not token.allows("cancel", limited)
    with pytest.raises(ValueError, match="unknown token action"):
        token.allows("delete")


def test_a_token_makes_no_wider_token(owner):
    web = pipeline("web")
    # Managing tokens is "edit", on no pipeline in particular: neither of these may.
    for scope in ({"actions": ["trigger"]}, {"actions": ["edit"], "pipelines": [web.pk]}):
        made = client_of(owner, **scope).post("/api/tokens/", {"name": "x"}, format="json")
        assert (made.status_code, made.json()["code"]) == (403, "TOKEN_SCOPE"), scope
    editor = client_of(owner, actions=["edit"], days=10)
    for body in (
        {"name": "wider", "actions": ["edit", "trigger"], "days": 5},
        {"name": "longer", "actions": ["edit"], "days": 11},
    ):
        answer = editor.post("/api/tokens/", body, format="json")
        assert (answer.status_code, answer.json()["code"]) == (403, "TOKEN_SCOPE"), body
    body = {"name": "narrow", "actions": ["edit"], "pipelines": [web.pk], "days": 5}
    assert editor.post("/api/tokens/", body, format="json").status_code == 201
    assert owner.api_tokens.count() == 4


def test_a_session_has_no_token_and_no_scope(owner, client):
    web = pipeline("web")
    client.force_login(owner)
    response = client.post(f"/api/pipelines/{web.pk}/builds/", {}, content_type="application/json")
    assert response.status_code == 201
    assert response.wsgi_request.user.api_token is None


def routes(resolver=None, prefix=""):
    for entry in (resolver or get_resolver()).url_patterns:
        if isinstance(entry, URLResolver):
            yield from routes(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry.callback


def test_every_unsafe_api_action_is_mapped():
    """A new endpoint that changes something falls to "staff" until it is put in the table:
    this says which, so the table is kept whole."""
    unmapped, scopes = [], set()
    for path, view in routes():
        cls = getattr(view, "cls", None)
        if cls is None or not path.startswith("api/") or cls.authentication_classes == []:
            continue  # not the API, or no user (a forge's webhook)
        name = f"{cls.__module__}.{cls.__qualname__}"
        actions = getattr(view, "actions", None)  # a viewset's {method: action}
        if actions is None:
            unsafe = [(m, None) for m in ("post", "put", "patch", "delete") if hasattr(cls, m)]
        else:
            unsafe = [(m, a) for m, a in actions.items() if m not in ("get", "head", "options")]
        if name == "artifacts.api.AgentArtifactViewSet":
            continue  # a job attempt's token, not an API token
        for method, action in unsafe:
            scopes.add(scope := scope_needed(cls, action or method))
            if scope == STAFF:
                unmapped.append(f"{method.upper()} {path} ({name}.{action})")
    assert unmapped == []
    assert scopes <= set(ACTIONS)
