"""The repository API and the webhook endpoints, through the real API and PostgreSQL: the
secret shown once, signatures, redeliveries, [skip ci], `on:` filters, what the build knows
of its commit, and refusals that store nothing."""

import json

import pytest
from rest_framework.test import APIClient

from builds.models import Build, Pipeline
from builds.source import ci_variables
from concurrency.models import ConcurrencyPolicy
from forge.models import CommitStatus, Repository
from tests.forge.test_webhooks import DELIVERY, fixture, headers_for
from tests.support import client_for, make_pipeline
from vault import services as vault

pytestmark = pytest.mark.django_db

# No agent serves "unit-tests": the builds' jobs never run.
DEFINITION = """
stages:
  - name: s
    jobs:
      - {id: j, runs-on: unit-tests, steps: [{run: "true"}]}
"""
FILTERED = (
    "on: {push: {branches: [main, 'release/*'], tags: ['v*']}, pull_request: {branches: [main]}}\n"
)
EVENTS = {
    "github": {"push": "push", "pull_request": "pull_request", "ping": "ping"},
    "gitlab": {"push": "Push Hook", "merge_request": "Merge Request Hook"},
    "gitea": {"push": "push", "pull_request": "pull_request"},
}  # fmt: skip


@pytest.fixture
def admin_client():
    return client_for("builds.view_pipeline", "builds.change_pipeline")


def meta(headers: dict) -> dict:
    out = {}
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        out[key if key == "CONTENT_TYPE" else f"HTTP_{key}"] = value
    return out


def with_repository(client, definition=DEFINITION, forge="github", name="hooked", **fields):
    pipeline = make_pipeline(name, definition)
    body = {"forge": forge, "clone_url": "https://forge.example/o/r.git", **fields}
    answer = client.put(f"/api/pipelines/{pipeline.pk}/repository/", body, format="json")
    assert answer.status_code == 201, answer.json()
    return pipeline, answer.json()["webhook_secret"]


def deliver(pipeline, forge, name, event, secret, body=None, delivery=None):
    body = fixture(forge, name) if body is None else body
    headers = headers_for(forge, event, body, secret=secret)
    headers.pop("Content-Type", None)
    if delivery:  # another delivery than the fixtures' one
        headers = {k: delivery if v == DELIVERY else v for k, v in headers.items()}
    return APIClient().post(
        f"/api/pipelines/{pipeline.pk}/hooks/{forge}/",
        data=body,
        content_type="application/json",
        **meta(headers),
    )


def test_the_webhook_secret_is_answered_once_and_rotated(admin_client):
    pipeline, secret = with_repository(admin_client)
    assert len(secret) >= 32
    again = admin_client.put(
        f"/api/pipelines/{pipeline.pk}/repository/",
        {"forge": "github", "clone_url": "https://forge.example/o/r2.git", "default_branch": "dev"},
        format="json",
    )
    assert again.status_code == 200
    assert "webhook_secret" not in again.json()
    shown = admin_client.get(f"/api/pipelines/{pipeline.pk}/repository/").json()
    assert shown["default_branch"] == "dev"
    assert "webhook_secret" not in shown
    assert secret.encode() not in bytes(Repository.objects.get().webhook_secret)  # encrypted
    rotated = admin_client.post(f"/api/pipelines/{pipeline.pk}/repository/rotate-secret/")
    new = rotated.json()["webhook_secret"]
    assert new != secret
    assert deliver(pipeline, "github", "ping", "ping", secret).status_code == 401
    assert deliver(pipeline, "github", "ping", "ping", new).json() == {"status": "pong"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"forge": "bitbucket"}, "forge"),
        ({"clone_url": "https://user:pw@forge.example/o/r.git"}, "clone_url"),
        ({"clone_url": "ftp://forge.example/r"}, "clone_url"),
        ({"clone_url": "https://token@forge.example/o/r.git"}, "clone_url"),
        # The agent clones over https, http and git:// only: ssh is refused at once, not
        # when the first build's checkout fails.
        ({"clone_url": "ssh://git@forge.example/o/r.git"}, "clone_url"),
        ({"clone_url": "git@forge.example:o/r.git"}, "clone_url"),
        ({"default_branch": "-x"}, "default_branch"),
        ({"clone_secret": "NOPE"}, "clone_secret"),
        ({"api_url": "https://t:k@api.example"}, "api_url"),
        ({"extra": "x"}, "extra"),
    ],
)
def test_bad_repository_settings_are_refused_and_store_nothing(admin_client, fields, field):
    pipeline = make_pipeline("refused", DEFINITION)
    body = {"forge": "github", "clone_url": "https://forge.example/o/r.git", **fields}
    answer = admin_client.put(f"/api/pipelines/{pipeline.pk}/repository/", body, format="json")
    assert answer.status_code == 400, answer.json()
    assert answer.json()["code"] in ("INVALID_REPOSITORY", "INVALID_REQUEST")
    assert field in str(answer.json())
    assert not Repository.objects.exists()


def test_the_repository_needs_change_pipeline():
    pipeline = make_pipeline("guarded", DEFINITION)
    reader = client_for("builds.view_pipeline")
    body = {"forge": "github", "clone_url": "https://forge.example/o/r.git"}
    assert (
        reader.put(f"/api/pipelines/{pipeline.pk}/repository/", body, format="json").status_code
        == 403
    )
    assert not Repository.objects.exists()


@pytest.mark.parametrize(
    ("forge", "name", "event", "expected"),
    [
        ("github", "push", "push", {"CI_EVENT": "push", "CI_COMMIT_BRANCH": "main"}),
        ("github", "push-tag", "push", {"CI_EVENT": "tag"}),
        ("github", "pull_request-opened", "pull_request", {"CI_EVENT": "pull_request"}),
        ("gitlab", "push", "push", {"CI_EVENT": "push"}),
        ("gitlab", "merge_request-open", "merge_request", {"CI_EVENT": "pull_request"}),
        ("gitea", "push", "push", {"CI_EVENT": "push"}),
        ("gitea", "pull_request-synchronized", "pull_request", {"CI_EVENT": "pull_request"}),
    ],
)
def test_an_event_makes_one_build_of_its_commit_and_a_redelivery_none(
    admin_client, forge, name, event, expected
):
    pipeline, secret = with_repository(admin_client, forge=forge)
    answer = deliver(pipeline, forge, name, EVENTS[forge][event], secret)
    assert answer.status_code == 201, answer.json()
    build = Build.objects.get(pk=answer.json()["build"])
    payload = json.loads(fixture(forge, name))
    assert build.source["sha"] in json.dumps(payload)  # the payload's commit
    assert build.source["repository_url"] == "https://forge.example/o/r.git"  # never the payload's
    assert expected.items() <= ci_variables(build.source).items()
    again = deliver(pipeline, forge, name, EVENTS[forge][event], secret)
    assert again.status_code == 200
    assert again.json()["status"] == "replayed"
    assert again.json()["build"] == build.pk
    assert Build.objects.count() == 1


def test_a_fork_pull_request_makes_an_untrusted_build(admin_client):
    pipeline, secret = with_repository(admin_client)
    answer = deliver(pipeline, "github", "pull_request-fork", "pull_request", secret)
    build = Build.objects.get(pk=answer.json()["build"])
    assert build.untrusted
    assert build.source["fork"]


@pytest.mark.parametrize("case", ["missing", "wrong", "other-body"])
def test_a_bad_signature_is_401_and_stores_nothing(admin_client, case):
    pipeline, secret = with_repository(admin_client)
    body = fixture("github", "push")
    headers = headers_for("github", "push", body, secret=secret)
    if case == "missing":
        del headers["X-Hub-Signature-256"]
    elif case == "wrong":
        headers = headers_for("github", "push", body, secret="not-the-secret")
    else:
        headers = headers_for("github", "push", body + b" ", secret=secret)
    headers.pop("Content-Type")
    answer = APIClient().post(
        f"/api/pipelines/{pipeline.pk}/hooks/github/", data=body,
        content_type="application/json", **meta(headers),
    )  # fmt: skip
    assert answer.status_code == 401
    code = "WEBHOOK_SIGNATURE_MISSING" if case == "missing" else "WEBHOOK_SIGNATURE_INVALID"
    assert answer.json()["code"] == code
    assert not Build.objects.exists()


def test_skip_ci_deleted_refs_and_closed_pull_requests_make_no_build(admin_client):
    pipeline, secret = with_repository(admin_client)
    body = json.loads(fixture("github", "push"))
    body["head_commit"]["message"] = "docs only [skip ci]"
    skipped = deliver(pipeline, "github", "push", "push", secret, body=json.dumps(body).encode())
    assert skipped.status_code == 200
    assert "skip CI" in skipped.json()["detail"]
    deleted = deliver(pipeline, "github", "push-deleted", "push", secret)
    assert deleted.json()["status"] == "ignored"
    closed = deliver(pipeline, "github", "pull_request-closed", "pull_request", secret)
    assert closed.json()["status"] == "ignored"
    assert not Build.objects.exists()


def test_on_filters_choose_which_events_build(admin_client):
    pipeline, secret = with_repository(admin_client, definition=FILTERED + DEFINITION)

    def push(ref: str, delivery: str):
        body = json.loads(fixture("github", "push"))
        body["ref"] = ref
        return deliver(
            pipeline, "github", "push", "push", secret, json.dumps(body).encode(), delivery
        )

    assert push("refs/heads/main", "d1").status_code == 201
    other = push("refs/heads/feature/x", "d2")
    assert other.status_code == 200
    assert other.json()["detail"] == "ignored: branch 'feature/x' matches no on.push.branches"
    assert push("refs/heads/release/2.0", "d3").status_code == 201
    assert push("refs/heads/release/2.0/x", "d4").status_code == 200  # `*` stops at `/`
    assert Build.objects.count() == 2
    same_id = push("refs/heads/release/3.0", "d3")  # a delivery id again, with another body
    assert (same_id.status_code, same_id.json()["code"]) == (409, "IDEMPOTENCY_KEY_REUSED")


def test_unknown_events_bad_payloads_and_large_bodies_are_refused(admin_client, settings):
    pipeline, secret = with_repository(admin_client)
    body = b'{"action": "opened"}'
    issues = deliver(pipeline, "github", "push", "issues", secret, body=body)
    assert (issues.status_code, issues.json()["code"]) == (400, "WEBHOOK_UNSUPPORTED_EVENT")
    bad = deliver(pipeline, "github", "push", "push", secret, body=b'{"ref": 7}')
    assert (bad.status_code, bad.json()["code"]) == (400, "WEBHOOK_INVALID_PAYLOAD")
    wrong_forge = deliver(pipeline, "gitlab", "push", "Push Hook", secret)
    assert (wrong_forge.status_code, wrong_forge.json()["code"]) == (400, "WEBHOOK_FORGE_MISMATCH")
    settings.WEBHOOK_MAX_BODY_BYTES = 100
    large = deliver(pipeline, "github", "push", "push", secret)
    assert (large.status_code, large.json()["code"]) == (413, "WEBHOOK_TOO_LARGE")
    assert not Build.objects.exists()


def test_a_pipeline_without_repository_answers_404():
    pipeline = make_pipeline("plain", DEFINITION)
    answer = deliver(pipeline, "github", "ping", "ping", "whatever")
    assert (answer.status_code, answer.json()["code"]) == (404, "REPOSITORY_NOT_FOUND")


def test_the_commit_branch_joins_the_concurrency_key(admin_client):
    ConcurrencyPolicy.objects.create(
        name="per-branch", group_key="deploy-${CI_COMMIT_BRANCH}", max_running=1, queue_length=5
    )
    pipeline, secret = with_repository(
        admin_client, definition="concurrency: per-branch\n" + DEFINITION
    )
    answer = deliver(pipeline, "github", "push", "push", secret)
    assert Build.objects.get(pk=answer.json()["build"]).concurrency_group == "deploy-main"


def test_a_build_owes_its_statuses_only_with_a_status_token(admin_client):
    pipeline = make_pipeline("statused", DEFINITION)
    vault.set_secret(pipeline, "STATUS_TOKEN", "ghp_statustoken")
    body = {
        "forge": "github",
        "clone_url": "https://forge.example/o/r.git",
        "status_secret": "STATUS_TOKEN",
    }
    secret = admin_client.put(
        f"/api/pipelines/{pipeline.pk}/repository/", body, format="json"
    ).json()["webhook_secret"]
    answer = deliver(pipeline, "github", "push", "push", secret)
    assert CommitStatus.objects.get().build_id == answer.json()["build"]
    assert Pipeline.objects.get(pk=pipeline.pk).repository.status_secret == "STATUS_TOKEN"
