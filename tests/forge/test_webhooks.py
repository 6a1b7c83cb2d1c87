"""forge.webhooks: signatures and payloads of GitHub, GitLab and Gitea/Forgejo deliveries.

Pure: no database. The fixtures are the forges' documented payloads, trimmed; their headers are
built here, as each forge sends them."""

import contextlib
import copy
import dataclasses
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from django.http.request import HttpHeaders
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciproject.errors import CIError
from forge import errors, webhooks
from forge.webhooks import Event, Ignored, Ping

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "s3cr3t-hook-key"
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
ZERO = "0" * 40


def fixture(forge: str, name: str) -> bytes:
    return (FIXTURES / forge / f"{name}.json").read_bytes()


def payload(forge: str, name: str) -> dict:
    return json.loads(fixture(forge, name))


def hmac_hex(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_headers(event: str, body: bytes, secret: str = SECRET) -> dict:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/5ff3a2c",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": DELIVERY,
        "X-GitHub-Hook-ID": "482193020",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
        "X-GitHub-Hook-Installation-Target-ID": "1296269",
        "X-Hub-Signature": "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest(),
        "X-Hub-Signature-256": "sha256=" + hmac_hex(body, secret),
    }


def gitlab_headers(event: str, body: bytes, secret: str = SECRET) -> dict:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/17.5.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": "02affd2d-2cba-4033-917d-ec22d5dc4b38",
        "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
        "Idempotency-Key": DELIVERY,
        "X-Gitlab-Token": secret,
    }


def gitea_headers(event: str, body: bytes, secret: str = SECRET, spelling: str = "gitea") -> dict:
    """What Gitea sends ("gitea"), what Forgejo sends ("forgejo": both spellings), or only
    Forgejo's own ("forgejo-only"), should it drop the Gitea ones."""
    event_type = "pull_request_sync" if b'"synchronized"' in body else event
    signature = hmac_hex(body, secret)
    own = {
        "Delivery": DELIVERY,
        "Event": event,
        "Event-Type": event_type,
        "Signature": signature,
    }
    headers = {"Content-Type": "application/json", "User-Agent": "Go-http-client/1.1"}
    prefixes = {"gitea": ["Gitea", "Gogs"], "forgejo": ["Forgejo", "Gitea", "Gogs"]}
    for prefix in prefixes.get(spelling, ["Forgejo"]):
        headers.update({f"X-{prefix}-{name}": value for name, value in own.items()})
    if spelling != "forgejo-only":
        headers.update(
            {
                "X-GitHub-Delivery": DELIVERY,
                "X-GitHub-Event": event,
                "X-GitHub-Event-Type": event_type,
                "X-Hub-Signature-256": "sha256=" + signature,
            }
        )
    return headers


HEADERS = {"github": github_headers, "gitlab": gitlab_headers, "gitea": gitea_headers}


def headers_for(forge: str, event: str, body: bytes, **options) -> dict:
    return HEADERS[forge](event, body, **options)


def django_headers(headers: dict) -> HttpHeaders:
    """As Django's request.headers has them (from the WSGI environ)."""
    environ = {}
    for name, value in headers.items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    return HttpHeaders(environ)


def parse(forge: str, name: str, event: str, **options):
    body = fixture(forge, name)
    return webhooks.parse(forge, headers_for(forge, event, body, **options), body)


def event(**fields) -> Event:
    defaults = dict(
        delivery=DELIVERY,
        tag="",
        target_branch="",
        pull_request=None,
        fork=False,
        message="",
        title="",
    )
    return Event(**(defaults | fields))


def sha1(label: str) -> str:  # the fixtures' commit ids are the SHA-1s of labels like these
    return hashlib.sha1(label.encode()).hexdigest()


GITHUB_URL = "https://github.com/octocat/Hello-World.git"
GITLAB_URL = "https://gitlab.example.com/mike/diaspora.git"
GITLAB_MR_URL = "https://gitlab.example.com/gitlabhq/gitlab-test.git"
GITEA_URL = "https://gitea.example.com/gitea/webhooks.git"
GITHUB_PR = dict(
    kind="pull_request",
    ref="refs/pull/42/head",
    branch="feature/greeting",
    target_branch="main",
    pull_request=42,
    repository_url=GITHUB_URL,
    title="Greet the world in French",
)
GITLAB_MR = dict(
    kind="pull_request",
    ref="refs/merge-requests/1/head",
    branch="ms-viewport",
    target_branch="master",
    pull_request=1,
    message="fixed readme\n",
    repository_url=GITLAB_MR_URL,
    title="MS-Viewport",
)
GITEA_PR = dict(
    kind="pull_request",
    ref="refs/pull/3/head",
    branch="feature/greeting",
    target_branch="main",
    pull_request=3,
    repository_url=GITEA_URL,
    title="Greet the world in French",
)
GITEA_PUSH_MESSAGE = "Add the push handler\n\nIt reads the payload's after.\n"

CASES = [
    # GitHub
    (
        "github",
        "push",
        "push",
        event(
            kind="push",
            sha=sha1("gh-c2"),
            ref="refs/heads/main",
            branch="main",
            message="Greet in French too\n\nCloses #12.",
            repository_url=GITHUB_URL,
        ),
    ),
    (
        "github",
        "push-tag",
        "push",  # an annotated tag: `after` is the tag object, sha the commit it tags
        event(
            kind="tag",
            sha=sha1("gh-c2"),
            ref="refs/tags/v1.2.0",
            branch="",
            tag="v1.2.0",
            message="Greet in French too\n\nCloses #12.",
            repository_url=GITHUB_URL,
        ),
    ),
    ("github", "push-deleted", "push", Ignored("the ref was deleted", DELIVERY)),
    (
        "github",
        "pull_request-opened",
        "pull_request",
        event(sha=sha1("gh-pr-42-head"), **GITHUB_PR),
    ),
    (
        "github",
        "pull_request-synchronize",
        "pull_request",
        event(sha=sha1("gh-pr-42-head-2"), **GITHUB_PR),
    ),
    (
        "github",
        "pull_request-reopened",
        "pull_request",
        event(sha=sha1("gh-pr-42-head"), **GITHUB_PR),
    ),
    (
        "github",
        "pull_request-closed",
        "pull_request",
        Ignored("pull request action 'closed' builds nothing", DELIVERY),
    ),
    (
        "github",
        "pull_request-fork",
        "pull_request",
        event(
            **GITHUB_PR
            | dict(
                sha=sha1("gh-pr-43-head"),
                ref="refs/pull/43/head",
                branch="fix-typo",
                pull_request=43,
                fork=True,
            )
        ),
    ),
    ("github", "ping", "ping", Ping(DELIVERY)),
    # GitLab
    (
        "gitlab",
        "push",
        "Push Hook",
        event(
            kind="push",
            sha=sha1("gl-c2"),
            ref="refs/heads/master",
            branch="master",
            message="fixed readme\n",
            repository_url=GITLAB_URL,
        ),
    ),
    (
        "gitlab",
        "tag_push",
        "Tag Push Hook",  # checkout_sha, the commit; `after` is the annotated tag's object
        event(
            kind="tag",
            sha=sha1("gl-c2"),
            ref="refs/tags/v1.0.0",
            branch="",
            tag="v1.0.0",
            repository_url=GITLAB_URL,
        ),
    ),
    ("gitlab", "push-deleted", "Push Hook", Ignored("the ref was deleted", DELIVERY)),
    (
        "gitlab",
        "merge_request-open",
        "Merge Request Hook",
        event(sha=sha1("gl-mr-head"), **GITLAB_MR),
    ),
    (
        "gitlab",
        "merge_request-update-oldrev",
        "Merge Request Hook",
        event(sha=sha1("gl-mr-head-2"), **GITLAB_MR),
    ),
    (
        "gitlab",
        "merge_request-update",
        "Merge Request Hook",
        Ignored("a merge request update without new commits builds nothing", DELIVERY),
    ),
    (
        "gitlab",
        "merge_request-reopen",
        "Merge Request Hook",
        event(sha=sha1("gl-mr-head"), **GITLAB_MR),
    ),
    (
        "gitlab",
        "merge_request-close",
        "Merge Request Hook",
        Ignored("merge request action 'close' builds nothing", DELIVERY),
    ),
    (
        "gitlab",
        "merge_request-fork",
        "Merge Request Hook",
        event(
            **GITLAB_MR
            | dict(
                sha=sha1("gl-mr-head"),
                ref="refs/merge-requests/7/head",
                pull_request=7,
                fork=True,
            )
        ),
    ),
    # Gitea
    (
        "gitea",
        "push",
        "push",
        event(
            kind="push",
            sha=sha1("gt-c2"),
            ref="refs/heads/main",
            branch="main",
            message=GITEA_PUSH_MESSAGE,
            repository_url=GITEA_URL,
        ),
    ),
    (
        "gitea",
        "push-tag",
        "push",
        event(
            kind="tag",
            sha=sha1("gt-c2"),
            ref="refs/tags/v1.0.0",
            branch="",
            tag="v1.0.0",
            message=GITEA_PUSH_MESSAGE,
            repository_url=GITEA_URL,
        ),
    ),
    ("gitea", "push-delete", "push", Ignored("the ref was deleted", DELIVERY)),
    ("gitea", "delete", "delete", Ignored("the ref was deleted", DELIVERY)),
    (
        "gitea",
        "create",
        "create",
        Ignored("a created ref builds from its push event, not this one", DELIVERY),
    ),
    ("gitea", "pull_request-opened", "pull_request", event(sha=sha1("gt-pr-3-head"), **GITEA_PR)),
    (
        "gitea",
        "pull_request-synchronized",
        "pull_request",
        event(sha=sha1("gt-pr-3-head-2"), **GITEA_PR),
    ),
    (
        "gitea",
        "pull_request-reopened",
        "pull_request",
        event(sha=sha1("gt-pr-3-head"), **GITEA_PR),
    ),
    (
        "gitea",
        "pull_request-closed",
        "pull_request",
        Ignored("pull request action 'closed' builds nothing", DELIVERY),
    ),
    (
        "gitea",
        "pull_request-fork",
        "pull_request",
        event(
            **GITEA_PR
            | dict(
                sha=sha1("gt-pr-4-head"),
                ref="refs/pull/4/head",
                branch="fix-typo",
                pull_request=4,
                fork=True,
            )
        ),
    ),
]


def case_ids(cases) -> list[str]:
    return [f"{forge}/{name}" for forge, name, *_ in cases]


GITEA_CASES = [case for case in CASES if case[0] == "gitea"]


@pytest.mark.parametrize(("forge", "name", "event_name", "expected"), CASES, ids=case_ids(CASES))
def test_each_fixture_parses_to_what_it_builds(forge, name, event_name, expected):
    assert parse(forge, name, event_name) == expected


@pytest.mark.parametrize("spelling", ["forgejo", "forgejo-only"])
@pytest.mark.parametrize(
    ("forge", "name", "event_name", "expected"),
    GITEA_CASES,
    ids=case_ids(GITEA_CASES),
)
def test_forgejo_deliveries_parse_as_giteas(forge, name, event_name, expected, spelling):
    body = fixture("gitea", name)
    headers = gitea_headers(event_name, body, spelling=spelling)
    for forge_name in ("gitea", "forgejo"):
        webhooks.verify(forge_name, headers, body, SECRET)
        assert webhooks.parse(forge_name, headers, body) == expected


@pytest.mark.parametrize(("forge", "name", "event_name", "expected"), CASES, ids=case_ids(CASES))
def test_headers_are_read_whatever_their_case(forge, name, event_name, expected):
    body = fixture(forge, name)
    headers = headers_for(forge, event_name, body)
    lowered = {key.lower(): value for key, value in headers.items()}  # as ASGI servers give
    assert webhooks.parse(forge, lowered, body) == expected
    assert webhooks.parse(forge, django_headers(headers), body) == expected
    webhooks.verify(forge, lowered, body, SECRET)
    webhooks.verify(forge, django_headers(headers), body, SECRET)


def test_event_is_frozen():
    parsed = parse("github", "push", "push")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.sha = ZERO


# Signatures


@pytest.mark.parametrize(("forge", "name", "event_name", "expected"), CASES, ids=case_ids(CASES))
def test_a_good_signature_verifies(forge, name, event_name, expected):
    body = fixture(forge, name)
    webhooks.verify(forge, headers_for(forge, event_name, body), body, SECRET)


@pytest.mark.parametrize("forge", ["github", "gitlab", "gitea"])
def test_another_secret_does_not_verify(forge):
    body = fixture(forge, "push")
    headers = headers_for(forge, "Push Hook" if forge == "gitlab" else "push", body)
    with pytest.raises(errors.WebhookUnauthorized) as caught:
        webhooks.verify(forge, headers, body, SECRET + "x")
    assert caught.value.code == "WEBHOOK_SIGNATURE_INVALID"
    assert caught.value.http_status == 401
    assert SECRET not in caught.value.detail


@pytest.mark.parametrize("forge", ["github", "gitea"])
def test_a_signature_over_another_body_does_not_verify(forge):
    signed = fixture(forge, "push")
    tampered = signed.replace(b"refs/heads/main", b"refs/heads/evil")
    assert tampered != signed
    with pytest.raises(errors.WebhookUnauthorized) as caught:
        webhooks.verify(forge, headers_for(forge, "push", signed), tampered, SECRET)
    assert caught.value.code == "WEBHOOK_SIGNATURE_INVALID"


@pytest.mark.parametrize(
    ("forge", "removed"),
    [
        ("github", ["X-Hub-Signature-256"]),  # the SHA-1 X-Hub-Signature alone is not enough
        ("gitlab", ["X-Gitlab-Token"]),
        ("gitea", ["X-Gitea-Signature", "X-Gogs-Signature"]),  # nor Gogs' or X-Hub-*
    ],
)
def test_a_missing_signature_is_told_apart(forge, removed):
    body = fixture(forge, "push")
    headers = headers_for(forge, "Push Hook" if forge == "gitlab" else "push", body)
    for name in removed:
        del headers[name]
    with pytest.raises(errors.WebhookSignatureMissing) as caught:
        webhooks.verify(forge, headers, body, SECRET)
    assert caught.value.code == "WEBHOOK_SIGNATURE_MISSING"
    assert caught.value.http_status == 401
    assert isinstance(caught.value, errors.WebhookUnauthorized)


def test_an_empty_signature_is_missing():
    # Gitea sends X-Gitea-Signature: "" from a hook without a secret.
    body = fixture("gitea", "push")
    headers = gitea_headers("push", body) | {"X-Gitea-Signature": ""}
    with pytest.raises(errors.WebhookSignatureMissing):
        webhooks.verify("gitea", headers, body, SECRET)


@pytest.mark.parametrize(
    "signature",
    [
        "{mac}",  # without its "sha256="
        "sha1={mac}",
        "SHA256={mac}",
        "sha256= {mac}",
        "sha256={mac}0",
        "sha256=zz",
        "sha256=\u00e9\u00e9",
        "sha256=" + "0" * 64,
    ],
)
def test_a_malformed_github_signature_does_not_verify(signature):
    body = fixture("github", "push")
    headers = github_headers("push", body)
    headers["X-Hub-Signature-256"] = signature.format(mac=hmac_hex(body))
    with pytest.raises(errors.WebhookUnauthorized) as caught:
        webhooks.verify("github", headers, body, SECRET)
    assert caught.value.code == "WEBHOOK_SIGNATURE_INVALID"


def test_an_uppercase_hex_signature_does_not_verify():
    body = fixture("gitea", "push")
    headers = gitea_headers("push", body, spelling="forgejo-only")
    headers["X-Forgejo-Signature"] = headers["X-Forgejo-Signature"].upper()
    with pytest.raises(errors.WebhookUnauthorized):
        webhooks.verify("gitea", headers, body, SECRET)


def test_forgejos_signature_is_checked_first():
    # A right X-Gitea-Signature does not make up for a wrong X-Forgejo-Signature.
    body = fixture("gitea", "push")
    headers = gitea_headers("push", body, spelling="forgejo") | {"X-Forgejo-Signature": "0" * 64}
    with pytest.raises(errors.WebhookUnauthorized):
        webhooks.verify("forgejo", headers, body, SECRET)
    webhooks.verify("forgejo", gitea_headers("push", body, spelling="forgejo-only"), body, SECRET)


@pytest.mark.parametrize("token", [SECRET[:-1], SECRET + "x", SECRET.upper(), "x" * 1000])
def test_a_wrong_gitlab_token_does_not_verify(token):
    body = fixture("gitlab", "push")
    with pytest.raises(errors.WebhookUnauthorized) as caught:
        webhooks.verify("gitlab", gitlab_headers("Push Hook", body, token), body, SECRET)
    assert caught.value.code == "WEBHOOK_SIGNATURE_INVALID"


def test_the_gitlab_token_is_compared_as_sent():
    # WSGI gives header bytes decoded as Latin-1: a non-ASCII token arrives as such.
    secret = "clé-secrète"
    body = fixture("gitlab", "push")
    sent = secret.encode().decode("latin-1")
    webhooks.verify("gitlab", {"X-Gitlab-Token": sent}, body, secret)
    webhooks.verify("gitlab", {"X-Gitlab-Token": "\u2603"}, body, "\u2603")  # not Latin-1


def test_verify_needs_a_secret_and_a_known_forge():
    with pytest.raises(ValueError, match="secret"):
        webhooks.verify("github", {}, b"{}", "")
    with pytest.raises(ValueError, match="unknown forge"):
        webhooks.verify("bitbucket", {}, b"{}", SECRET)
    with pytest.raises(ValueError, match="unknown forge"):
        webhooks.parse("GitHub", {}, b"{}")


# Headers: the event and the delivery


@pytest.mark.parametrize(
    ("forge", "removed"),
    [
        ("github", ["X-GitHub-Event"]),
        ("gitlab", ["X-Gitlab-Event"]),
        ("gitea", ["X-Gitea-Event", "X-Gogs-Event", "X-GitHub-Event"]),  # only its own count
    ],
)
def test_a_missing_event_header(forge, removed):
    body = fixture(forge, "push")
    headers = headers_for(forge, "Push Hook" if forge == "gitlab" else "push", body)
    for name in removed:
        del headers[name]
    with pytest.raises(errors.WebhookEventMissing) as caught:
        webhooks.parse(forge, headers, body)
    assert caught.value.code == "WEBHOOK_EVENT_MISSING"
    assert caught.value.http_status == 400


@pytest.mark.parametrize(
    ("forge", "event_name"),
    [
        ("github", "issues"),
        ("github", "pull_request_review"),
        ("github", "workflow_run"),
        ("gitlab", "Issue Hook"),
        ("gitlab", "Pipeline Hook"),
        ("gitlab", "System Hook"),
        ("gitlab", "push"),  # GitLab's header is "Push Hook"
        ("gitea", "issues"),
        ("gitea", "pull_request_approved"),  # Gitea's reviews are events of their own
        ("gitea", "release"),
        ("gitea", "ping"),
    ],
)
def test_an_unsupported_event(forge, event_name):
    body = b'{"action": "opened"}'
    with pytest.raises(errors.UnsupportedEvent) as caught:
        webhooks.parse(forge, headers_for(forge, event_name, body), body)
    assert caught.value.code == "WEBHOOK_UNSUPPORTED_EVENT"
    assert caught.value.http_status == 400
    assert caught.value.fields == {"event": event_name}


@pytest.mark.parametrize(
    ("forge", "removed"),
    [
        ("github", ["X-GitHub-Delivery"]),
        ("gitlab", ["Idempotency-Key", "X-Gitlab-Event-UUID"]),  # not X-Gitlab-Webhook-UUID
        ("gitea", ["X-Gitea-Delivery", "X-Gogs-Delivery", "X-GitHub-Delivery"]),
    ],
)
def test_a_missing_delivery_id(forge, removed):
    body = fixture(forge, "push")
    headers = headers_for(forge, "Push Hook" if forge == "gitlab" else "push", body)
    for name in removed:
        del headers[name]
    with pytest.raises(errors.WebhookDeliveryMissing) as caught:
        webhooks.parse(forge, headers, body)
    assert caught.value.code == "WEBHOOK_DELIVERY_MISSING"
    assert caught.value.http_status == 400
    assert isinstance(caught.value, errors.InvalidWebhook)


def test_gitlabs_delivery_is_the_idempotency_key_else_the_event_uuid():
    body = fixture("gitlab", "push")
    headers = gitlab_headers("Push Hook", body)
    assert webhooks.parse("gitlab", headers, body).delivery == DELIVERY
    del headers["Idempotency-Key"]  # GitLab before 17.4
    assert webhooks.parse("gitlab", headers, body).delivery == headers["X-Gitlab-Event-UUID"]


@pytest.mark.parametrize("delivery", ["has space", "x" * 201, "caf\u00e9", "tab\there"])
def test_a_malformed_delivery_id(delivery):
    body = fixture("github", "push")
    headers = github_headers("push", body) | {"X-GitHub-Delivery": delivery}
    with pytest.raises(errors.InvalidWebhook) as caught:
        webhooks.parse("github", headers, body)
    assert caught.value.code == "WEBHOOK_INVALID_PAYLOAD"


# Payloads that are not what the forge documents


class _Delete:
    def __repr__(self):
        return "DELETE"


DELETE = _Delete()  # a key to remove


def mutated(forge: str, name: str, path: tuple, value) -> bytes:
    data = payload(forge, name)
    container = data
    for key in path[:-1]:
        container = container[key]
    if value is DELETE:
        del container[path[-1]]
    else:
        container[path[-1]] = value
    return json.dumps(data).encode()


INVALID = [
    # (forge, fixture, event, path, value, field)
    ("github", "push", "push", ("after",), DELETE, "after"),
    ("github", "push", "push", ("after",), "not-a-sha", "after"),
    ("github", "push", "push", ("after",), "A" * 40, "after"),
    ("github", "push", "push", ("after",), "a" * 39, "after"),
    ("github", "push", "push", ("after",), None, "after"),
    ("github", "push", "push", ("ref",), DELETE, "ref"),
    ("github", "push", "push", ("ref",), 5, "ref"),
    ("github", "push", "push", ("ref",), ["refs/heads/main"], "ref"),
    ("github", "push", "push", ("ref",), "refs/pull/1/head", "ref"),
    ("github", "push", "push", ("ref",), "main", "ref"),
    ("github", "push", "push", ("ref",), "refs/heads/", "ref"),
    ("github", "push", "push", ("ref",), "refs/heads/a..b", "ref"),
    ("github", "push", "push", ("ref",), "refs/heads/a b", "ref"),
    ("github", "push", "push", ("ref",), "refs/heads/x.lock", "ref"),
    ("github", "push", "push", ("ref",), "refs/heads/.hidden", "ref"),
    ("github", "push", "push", ("deleted",), "false", "deleted"),
    ("github", "push", "push", ("deleted",), 0, "deleted"),
    ("github", "push", "push", ("head_commit",), "abc", "head_commit"),
    ("github", "push", "push", ("head_commit", "id"), 1, "head_commit.id"),
    ("github", "push", "push", ("head_commit", "message"), DELETE, "head_commit.message"),
    ("github", "push", "push", ("repository",), DELETE, "repository"),
    ("github", "push", "push", ("repository", "clone_url"), None, "repository.clone_url"),
    ("github", "push", "push", ("repository", "clone_url"), "file:///etc", "repository.clone_url"),
    ("github", "push", "push", ("repository", "clone_url"), "ext::sh -c x", "repository.clone_url"),
    ("github", "push", "push", ("repository", "clone_url"), "https://x/ y", "repository.clone_url"),
    ("github", "pull_request-opened", "pull_request", ("action",), DELETE, "action"),
    ("github", "pull_request-opened", "pull_request", ("action",), 1, "action"),
    ("github", "pull_request-opened", "pull_request", ("number",), "42", "number"),
    ("github", "pull_request-opened", "pull_request", ("number",), True, "number"),
    ("github", "pull_request-opened", "pull_request", ("number",), 42.0, "number"),
    ("github", "pull_request-opened", "pull_request", ("number",), 0, "number"),
    ("github", "pull_request-opened", "pull_request", ("number",), 2**31, "number"),
    ("github", "pull_request-opened", "pull_request", ("pull_request",), [], "pull_request"),
    (
        "github",
        "pull_request-opened",
        "pull_request",
        ("pull_request", "head", "sha"),
        DELETE,
        "pull_request.head.sha",
    ),
    (
        "github",
        "pull_request-opened",
        "pull_request",
        ("pull_request", "head", "ref"),
        "refs/heads/a~1",
        "pull_request.head.ref",
    ),
    (
        "github",
        "pull_request-opened",
        "pull_request",
        ("pull_request", "base", "repo"),
        None,
        "pull_request.base.repo",
    ),
    (
        "github",
        "pull_request-opened",
        "pull_request",
        ("pull_request", "title"),
        None,
        "pull_request.title",
    ),
    ("gitlab", "push", "Push Hook", ("object_kind",), "tag_push", "object_kind"),
    ("gitlab", "push", "Push Hook", ("ref",), "refs/tags/v1", "ref"),
    ("gitlab", "tag_push", "Tag Push Hook", ("ref",), "refs/heads/main", "ref"),
    ("gitlab", "push", "Push Hook", ("checkout_sha",), "HEAD", "checkout_sha"),
    ("gitlab", "push", "Push Hook", ("commits",), {}, "commits"),
    ("gitlab", "push", "Push Hook", ("commits", 1, "id"), "xyz", "commits.1.id"),
    ("gitlab", "push", "Push Hook", ("project",), DELETE, "project"),
    ("gitlab", "push", "Push Hook", ("project", "git_http_url"), 7, "project.git_http_url"),
    (
        "gitlab",
        "merge_request-open",
        "Merge Request Hook",
        ("object_attributes",),
        DELETE,
        "object_attributes",
    ),
    (
        "gitlab",
        "merge_request-open",
        "Merge Request Hook",
        ("object_attributes",),
        "open",
        "object_attributes",
    ),
    (
        "gitlab",
        "merge_request-open",
        "Merge Request Hook",
        ("object_attributes", "action"),
        ["open"],
        "object_attributes.action",
    ),
    (
        "gitlab",
        "merge_request-open",
        "Merge Request Hook",
        ("object_attributes", "iid"),
        "1",
        "object_attributes.iid",
    ),
    (
        "gitlab",
        "merge_request-open",
        "Merge Request Hook",
        ("object_attributes", "last_commit"),
        None,
        "object_attributes.last_commit",
    ),
    (
        "gitlab",
        "merge_request-open",
        "Merge Request Hook",
        ("object_attributes", "source_project_id"),
        "14",
        "object_attributes.source_project_id",
    ),
    (
        "gitlab",
        "merge_request-update-oldrev",
        "Merge Request Hook",
        ("object_attributes", "oldrev"),
        "deadbeef",
        "object_attributes.oldrev",
    ),
    ("gitlab", "merge_request-open", "Merge Request Hook", ("object_kind",), "push", "object_kind"),
    ("gitea", "push", "push", ("after",), 12, "after"),
    ("gitea", "push", "push", ("commits",), "none", "commits"),
    ("gitea", "push", "push", ("ref",), None, "ref"),
    ("gitea", "pull_request-opened", "pull_request", ("number",), "3", "number"),
    (
        "gitea",
        "pull_request-opened",
        "pull_request",
        ("pull_request", "head"),
        DELETE,
        "pull_request.head",
    ),
]


@pytest.mark.parametrize(
    ("forge", "name", "event_name", "path", "value", "field"),
    INVALID,
    ids=[f"{c[0]}/{c[1]}:{'.'.join(map(str, c[3]))}={c[4]!r:.20}" for c in INVALID],
)
def test_a_payload_without_what_the_forge_documents_is_invalid(
    forge, name, event_name, path, value, field
):
    body = mutated(forge, name, path, value)
    with pytest.raises(errors.InvalidWebhook) as caught:
        webhooks.parse(forge, headers_for(forge, event_name, body), body)
    assert type(caught.value) is errors.InvalidWebhook
    assert caught.value.code == "WEBHOOK_INVALID_PAYLOAD"
    assert caught.value.http_status == 400
    assert caught.value.fields == {"event": event_name, "field": field}
    assert caught.value.detail.startswith(f"the {forge} {event_name} payload's {field}: ")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D",  # a form-encoded hook
        b"[]",
        b'[{"ref": "refs/heads/main"}]',
        b'"push"',
        b"42",
        b"null",
        b"true",
        b'{"ref": "refs/heads/main"',
        b"\xff\xfe\xfa",
        b'{"after": NaN}',
        b'{"after": Infinity}',
        b'{"ref": "refs/heads/a", "ref": "refs/heads/b"}',  # a key twice
        b"[" * 100_000 + b"]" * 100_000,
        b'{"number": 1' + b"0" * 5000 + b"}",  # past Python's int digits limit
    ],
    ids=lambda body: repr(body[:30]),
)
@pytest.mark.parametrize(
    ("forge", "event_name"),
    [("github", "push"), ("github", "ping"), ("gitlab", "Merge Request Hook"), ("gitea", "push")],
)
def test_a_body_that_is_not_a_json_object_is_invalid(body, forge, event_name):
    with pytest.raises(errors.InvalidWebhook) as caught:
        webhooks.parse(forge, headers_for(forge, event_name, body), body)
    assert caught.value.code == "WEBHOOK_INVALID_PAYLOAD"
    assert caught.value.fields == {"event": event_name}


# What builds and what does not, beyond the fixtures


@pytest.mark.parametrize(
    "action",
    ["closed", "edited", "labeled", "assigned", "ready_for_review", "converted_to_draft", ""],
)
def test_other_github_pull_request_actions_build_nothing(action):
    body = mutated("github", "pull_request-opened", ("action",), action)
    parsed = webhooks.parse("github", github_headers("pull_request", body), body)
    assert parsed == Ignored(f"pull request action {action!r} builds nothing", DELIVERY)


def test_an_ignored_action_needs_nothing_else():
    body = b'{"action": "labeled"}'
    parsed = webhooks.parse("gitea", gitea_headers("pull_request", body), body)
    assert parsed == Ignored("pull request action 'labeled' builds nothing", DELIVERY)


@pytest.mark.parametrize(
    "action", ["close", "merge", "approved", "unapproved", "approval", "unapproval"]
)
def test_other_gitlab_merge_request_actions_build_nothing(action):
    body = mutated("gitlab", "merge_request-open", ("object_attributes", "action"), action)
    parsed = webhooks.parse("gitlab", gitlab_headers("Merge Request Hook", body), body)
    assert parsed == Ignored(f"merge request action {action!r} builds nothing", DELIVERY)


def test_a_gitlab_merge_request_event_without_an_action_builds_nothing():
    body = mutated("gitlab", "merge_request-open", ("object_attributes", "action"), DELETE)
    parsed = webhooks.parse("gitlab", gitlab_headers("Merge Request Hook", body), body)
    assert parsed == Ignored("a merge request event without an action builds nothing", DELIVERY)


def test_a_gitlab_update_with_a_null_oldrev_brought_no_commits():
    body = mutated("gitlab", "merge_request-update-oldrev", ("object_attributes", "oldrev"), None)
    parsed = webhooks.parse("gitlab", gitlab_headers("Merge Request Hook", body), body)
    assert isinstance(parsed, Ignored)


@pytest.mark.parametrize("event_name", ["create", "delete"])
def test_githubs_create_and_delete_build_nothing(event_name):
    body = b'{"ref": "v1.0.0", "ref_type": "tag"}'
    parsed = webhooks.parse("github", github_headers(event_name, body), body)
    assert isinstance(parsed, Ignored)


def test_a_github_push_deleting_its_ref_by_zero_after_alone():
    body = mutated("github", "push-deleted", ("deleted",), DELETE)
    assert webhooks.parse("github", github_headers("push", body), body) == Ignored(
        "the ref was deleted", DELIVERY
    )


def test_a_github_push_without_head_commit_builds_after():
    body = mutated("github", "push", ("head_commit",), None)
    parsed = webhooks.parse("github", github_headers("push", body), body)
    assert (parsed.sha, parsed.message) == (payload("github", "push")["after"], "")


def test_a_github_pull_request_from_a_deleted_fork_is_a_fork():
    body = mutated("github", "pull_request-opened", ("pull_request", "head", "repo"), None)
    assert webhooks.parse("github", github_headers("pull_request", body), body).fork is True


def test_a_gitlab_tag_deleted():
    data = payload("gitlab", "tag_push") | {"after": ZERO, "checkout_sha": None}
    body = json.dumps(data).encode()
    parsed = webhooks.parse("gitlab", gitlab_headers("Tag Push Hook", body), body)
    assert parsed == Ignored("the ref was deleted", DELIVERY)


def test_a_gitlab_push_without_checkout_sha_builds_after():
    body = mutated("gitlab", "push", ("checkout_sha",), DELETE)
    parsed = webhooks.parse("gitlab", gitlab_headers("Push Hook", body), body)
    assert parsed.sha == payload("gitlab", "push")["after"]


def test_a_gitlab_push_message_is_the_checkout_commits_whatever_the_order():
    data = payload("gitlab", "push")
    data["commits"].reverse()  # oldest first, as older GitLab versions list them
    body = json.dumps(data).encode()
    parsed = webhooks.parse("gitlab", gitlab_headers("Push Hook", body), body)
    assert parsed.message == "fixed readme\n"
    data["commits"] = [commit for commit in data["commits"] if commit["id"] != parsed.sha]
    body = json.dumps(data).encode()
    assert webhooks.parse("gitlab", gitlab_headers("Push Hook", body), body).message == ""


def test_a_gitea_push_without_head_commit_takes_the_message_from_its_commits():
    data = payload("gitea", "push") | {"head_commit": None}
    body = json.dumps(data).encode()
    parsed = webhooks.parse("gitea", gitea_headers("push", body), body)
    assert (parsed.sha, parsed.message) == (data["after"], GITEA_PUSH_MESSAGE)
    data["commits"] = None  # Go's nil slice
    body = json.dumps(data).encode()
    assert webhooks.parse("gitea", gitea_headers("push", body), body).message == ""


def test_a_ping_needs_a_json_object_only():
    body = b'{"zen": "Keep it logically awesome."}'
    assert webhooks.parse("github", github_headers("ping", body), body) == Ping(DELIVERY)


def test_the_body_cap_default():
    assert webhooks.DEFAULT_MAX_BODY_BYTES == 5 * 1024 * 1024


def test_the_errors_are_the_projects():
    for error in (errors.WebhookUnauthorized, errors.InvalidWebhook, errors.UnsupportedEvent):
        assert issubclass(error, CIError)


# [skip ci]


@pytest.mark.parametrize(
    ("message", "skips"),
    [
        ("Fix typo [skip ci]", True),
        ("[ci skip] docs only", True),
        ("Update README\n\n[no ci]", True),
        ("[skip actions]", True),
        ("bump [actions skip]", True),
        ("[SKIP CI] shouting", True),
        ("[Ci Skip]", True),
        ("Fix typo", False),
        ("", False),
        ("skip ci", False),
        ("[skip-ci]", False),
        ("[skipci]", False),
        ("[ skip ci ]", False),
        ("skip-checks: true", False),
    ],
)
def test_skips_ci(message, skips):
    assert webhooks.skips_ci(message) is skips


# Whatever the payload: the forge's errors or a result, nothing else

FORGE_ERRORS = (errors.InvalidWebhook, errors.UnsupportedEvent)
HANDLED = [
    ("github", "push"),
    ("github", "pull_request"),
    ("github", "ping"),
    ("github", "create"),
    ("github", "delete"),
    ("gitlab", "Push Hook"),
    ("gitlab", "Tag Push Hook"),
    ("gitlab", "Merge Request Hook"),
    ("gitea", "push"),
    ("gitea", "pull_request"),
    ("gitea", "create"),
    ("gitea", "delete"),
]
KEYS = [
    "ref",
    "after",
    "deleted",
    "head_commit",
    "id",
    "message",
    "commits",
    "repository",
    "clone_url",
    "full_name",
    "action",
    "number",
    "pull_request",
    "title",
    "head",
    "base",
    "sha",
    "repo",
    "object_kind",
    "checkout_sha",
    "project",
    "git_http_url",
    "object_attributes",
    "iid",
    "source_branch",
    "target_branch",
    "source_project_id",
    "target_project_id",
    "last_commit",
    "oldrev",
]
STRINGS = [
    sha1("x"),
    ZERO,
    "refs/heads/main",
    "refs/tags/v1",
    "main",
    "https://example.com/a.git",
    "opened",
    "synchronize",
    "synchronized",
    "reopened",
    "open",
    "reopen",
    "update",
    "push",
    "tag_push",
    "merge_request",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(STRINGS)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=40,
)


def assert_parses_or_refuses(forge: str, event_name: str, body: bytes) -> None:
    try:
        result = webhooks.parse(forge, headers_for(forge, event_name, body), body)
    except FORGE_ERRORS as exc:
        code = exc.code
    else:
        code = None
    if code is not None:
        assert code.startswith("WEBHOOK_")
        return
    assert isinstance(result, Event | Ping | Ignored)
    if isinstance(result, Event):
        assert len(result.sha) == 40
        assert result.ref.startswith(("refs/heads/", "refs/tags/", "refs/pull/", "refs/merge-"))
        assert result.repository_url.startswith(("http://", "https://"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(HANDLED), json_values)
def test_any_json_value_parses_or_is_refused(forge_event, value):
    forge, event_name = forge_event
    assert_parses_or_refuses(forge, event_name, json.dumps(value).encode())


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CASES), st.data())
def test_any_fixture_with_a_part_replaced_parses_or_is_refused(case, data):
    forge, name, event_name, _ = case
    original = payload(forge, name)
    changed = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(paths(changed))))
        if not path:
            changed = data.draw(json_values)
            break
        container = changed
        for key in path[:-1]:
            container = container[key]
        if data.draw(st.booleans()) and isinstance(container, dict):
            del container[path[-1]]
        else:
            container[path[-1]] = data.draw(json_values)
    assert_parses_or_refuses(forge, event_name, json.dumps(changed).encode())


header_names = st.sampled_from(
    [
        "X-Hub-Signature-256",
        "x-hub-signature-256",
        "X-Gitlab-Token",
        "X-Gitea-Signature",
        "X-Forgejo-Signature",
        "X-GitHub-Event",
        "X-Gitlab-Event",
        "X-Gitea-Event",
        "X-Forgejo-Event",
        "X-GitHub-Delivery",
        "Idempotency-Key",
        "X-Gitlab-Event-UUID",
        "X-Gitea-Delivery",
        "X-Forgejo-Delivery",
    ]
) | st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["github", "gitlab", "gitea", "forgejo"]),
    st.dictionaries(header_names, st.text(max_size=80), max_size=6),
    st.binary(max_size=200),
)
def test_any_headers_verify_or_are_refused(forge, headers, body):
    with contextlib.suppress(errors.WebhookUnauthorized):
        webhooks.verify(forge, headers, body, SECRET)
    with contextlib.suppress(*FORGE_ERRORS):
        webhooks.parse(forge, headers, body)
