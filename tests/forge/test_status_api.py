"""The commit-status clients against a local server: each forge's documented request, and
what each answer means for the caller (delivered, retry, give up). No database."""

import logging
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests

from builds.statuses import BUILD_FINAL, BuildStatus
from forge import status_api
from forge.status_api import (
    GITEA,
    GITHUB,
    GITLAB,
    StatusConfigError,
    StatusDeliveryError,
    default_api_url,
    describe,
    forge_state,
    post_status,
    repository_path,
)
from tests.forge.statusserver import Answer, StatusServer

TOKEN = "tok-Secret-0123456789abcdef"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def server():
    with StatusServer() as running:
        yield running


def post(server, forge, state, *, repo="owner/repo", api=None, **options):
    arguments = dict(
        context="ciproject/build",
        target_url="https://ci.example.com/builds/7",
        description="running",
        ref="main",
        token=TOKEN,
        timeout=5,
    )
    arguments.update(options)
    return post_status(forge, api or server.url, repo, SHA, state, **arguments)


def refusal(server, forge, state="pending", **options) -> StatusDeliveryError:
    with pytest.raises(StatusDeliveryError) as caught:
        post(server, forge, state, **options)
    assert TOKEN not in str(caught.value)
    return caught.value


# The requests, per forge ------------------------------------------------------------------


def test_github_request_is_the_documented_one(server):
    assert post(server, GITHUB, "pending", api=f"{server.url}/api/v3/") == 201

    [request] = server.requests
    assert request.method == "POST"
    assert request.path == f"/api/v3/repos/owner/repo/statuses/{SHA}"
    assert request.headers["accept"] == "application/vnd.github+json"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["x-github-api-version"] == "2022-11-28"
    assert request.headers["user-agent"] == "ciproject"
    assert request.headers["content-type"] == "application/json"
    assert "private-token" not in request.headers
    assert request.json == {
        "state": "pending",
        "target_url": "https://ci.example.com/builds/7",
        "description": "running",
        "context": "ciproject/build",
    }


def test_gitea_request_is_the_documented_one(server):
    assert post(server, GITEA, "warning") == 201

    [request] = server.requests
    assert request.method == "POST"
    assert request.path == f"/api/v1/repos/owner/repo/statuses/{SHA}"
    assert request.headers["authorization"] == f"token {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert "x-github-api-version" not in request.headers
    assert request.json == {
        "state": "warning",
        "target_url": "https://ci.example.com/builds/7",
        "description": "running",
        "context": "ciproject/build",
    }


def test_gitlab_request_is_the_documented_one(server):
    assert post(server, GITLAB, "running", repo="group/sub/repo") == 201

    [request] = server.requests
    assert request.method == "POST"
    assert request.path == f"/api/v4/projects/group%2Fsub%2Frepo/statuses/{SHA}"
    assert request.headers["private-token"] == TOKEN
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert request.json == {
        "state": "running",
        "ref": "main",
        "name": "ciproject/build",
        "target_url": "https://ci.example.com/builds/7",
        "description": "running",
    }


def test_ref_goes_to_gitlab_only_and_absent_fields_are_left_out(server):
    post(server, GITHUB, "success", target_url=None, description=None)
    post(server, GITLAB, "success", target_url=None, description=None, ref=None)

    github, gitlab = server.wait_for_requests(2)
    assert github.json == {"state": "success", "context": "ciproject/build"}
    assert gitlab.json == {"state": "success", "name": "ciproject/build"}


@pytest.mark.parametrize("forge", [GITHUB, GITEA, GITLAB])
def test_a_long_description_is_cut_to_140_characters(server, forge):
    post(server, forge, "pending", description="é" * 200)
    post(server, forge, "pending", description="x" * 140)

    cut, whole = (request.json["description"] for request in server.wait_for_requests(2))
    assert len(cut) == 140
    assert cut == "é" * 139 + "…"
    assert whole == "x" * 140


def test_states_a_forge_does_not_take_are_refused_before_any_request(server):
    for forge, state in [(GITHUB, "running"), (GITHUB, "warning"), (GITLAB, "failure")]:
        with pytest.raises(ValueError, match="takes no state"):
            post(server, forge, state)
    with pytest.raises(ValueError, match="owner/repo"):
        post(server, GITHUB, "pending", repo="group/sub/repo")
    with pytest.raises(ValueError, match="SHA"):
        post_status(GITHUB, server.url, "o/r", "main", "pending", context="c", token=TOKEN)
    with pytest.raises(ValueError, match="credentials"):
        post(server, GITEA, "pending", api=server.url.replace("//", f"//u:{TOKEN}@"))
    assert server.requests == []


# The answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("forge", [GITHUB, GITEA, GITLAB])
def test_a_server_error_is_retryable(server, forge):
    server.answer(Answer(500, {"message": "internal error"}))

    error = refusal(server, forge)
    assert error.retryable
    assert error.http_status == 500
    assert error.retry_after is None
    assert "500" in error.message
    assert "internal error" in error.message


def test_429_is_retryable_after_what_retry_after_says(server):
    server.answer(Answer(429, {"message": "slow down"}, {"Retry-After": "7"}))
    error = refusal(server, GITLAB)
    assert (error.retryable, error.http_status, error.retry_after) == (True, 429, 7.0)

    later = datetime.now(UTC) + timedelta(seconds=120)
    server.answer(Answer(503, "busy", {"Retry-After": format_datetime(later, usegmt=True)}))
    error = refusal(server, GITEA)
    assert error.retryable
    assert 100 < error.retry_after <= 120

    server.answer(Answer(429, {"message": "slow down"}))
    assert refusal(server, GITHUB).retry_after is None


def test_github_rate_limit_403_is_retryable_until_the_reset(server):
    reset = int(time.time()) + 60
    limited = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
    server.answer(Answer(403, {"message": "API rate limit exceeded for installation"}, limited))

    error = refusal(server, GITHUB)
    assert error.retryable
    assert error.http_status == 403
    assert 50 < error.retry_after <= 60


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "Bad credentials"),
        (403, "Resource not accessible by integration"),
        (404, "Not Found"),
        (422, "Validation Failed"),
    ],
)
@pytest.mark.parametrize("forge", [GITHUB, GITEA, GITLAB])
def test_other_4xx_are_final_and_say_what_the_forge_answered(server, forge, status, message):
    server.answer(Answer(status, {"message": message, "documentation_url": "https://x"}))

    error = refusal(server, forge)
    assert not error.retryable
    assert error.retry_after is None
    assert error.http_status == status
    assert f"answered {status}" in error.message
    assert message in error.message
    assert "documentation_url" not in error.message  # noise, out of the 300 characters


def test_an_answer_echoing_the_token_is_scrubbed_and_trimmed(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.answer(Answer(401, {"message": f"token {TOKEN} is not valid " + "x" * 1000}))

    error = refusal(server, GITLAB)
    assert "[token] is not valid" in error.message
    detail = error.message.split(": ", 1)[1]
    assert len(detail) == 300
    assert detail.endswith("…")

    server.answer(Answer(201))
    post(server, GITHUB, "success")
    assert TOKEN not in caplog.text
    assert "delivered" in caplog.text  # the log did see the requests


def test_a_json_error_with_details_keeps_them(server):
    errors = [{"field": "description", "code": "custom", "message": "description is too long"}]
    server.answer(Answer(422, {"message": "Validation Failed", "errors": errors}))

    assert "description is too long" in refusal(server, GITHUB).message


def test_gitlab_refusing_the_same_state_again_counts_as_delivered(server):
    message = 'Cannot transition status via :run from :running (Reason(s): Status cannot transition via "run")'  # noqa: E501
    server.answer(Answer(400, {"message": message}))

    assert post(server, GITLAB, "running") == 400


def test_other_400s_are_not_delivered(server):
    server.answer(Answer(400, {"message": "Cannot transition status via :run from :running"}))
    assert not refusal(server, GITHUB).retryable  # GitLab's answer, only from GitLab

    server.answer(Answer(400, {"message": {"target_url": ["is blocked"]}}))
    error = refusal(server, GITLAB)
    assert not error.retryable
    assert "is blocked" in error.message


def test_gitlab_409_lock_conflict_is_retryable(server):
    server.answer(Answer(409, {"message": "Another update to this commit status is in progress"}))

    error = refusal(server, GITLAB)
    assert (error.retryable, error.http_status) == (True, 409)
    server.answer(Answer(409, {"message": "Conflict"}))
    assert not refusal(server, GITEA).retryable


def test_a_hanging_forge_times_out_as_retryable(server):
    server.answer(Answer(hang=True))

    started = time.monotonic()
    error = refusal(server, GITHUB, timeout=0.3)
    assert time.monotonic() - started < 3
    assert error.retryable
    assert error.http_status is None
    assert "did not answer within 0.3 s" in error.message
    assert len(server.wait_for_requests(1)) == 1


def test_an_unreachable_forge_is_retryable():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    with pytest.raises(StatusDeliveryError) as caught:
        post_status(
            GITEA, f"http://127.0.0.1:{port}", "o/r", SHA, "pending", context="c", token=TOKEN
        )
    assert caught.value.retryable
    assert caught.value.http_status is None
    assert "could not reach Gitea" in caught.value.message
    assert TOKEN not in caught.value.message


def test_redirects_are_not_followed_so_the_token_stays(server):
    with StatusServer() as elsewhere:
        server.answer(Answer(307, "", {"Location": f"{elsewhere.url}/api/v4/projects/x"}))

        error = refusal(server, GITLAB)
        assert not error.retryable
        assert error.http_status == 307
        assert elsewhere.url in error.message
        assert elsewhere.requests == []


def test_a_session_may_be_reused(server):
    with requests.Session() as session:
        assert post(server, GITEA, "pending", session=session) == 201
        assert post(server, GITEA, "success", session=session) == 201
    assert [r.json["state"] for r in server.wait_for_requests(2)] == ["pending", "success"]


def test_a_request_no_forge_takes_is_a_final_delivery_error_too(server):
    # The delivery loop gives it up at once; who checks a configuration sees a ValueError.
    with pytest.raises(StatusConfigError) as caught:
        post(server, GITLAB, "pending", repo="repo")
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, StatusDeliveryError)
    assert not caught.value.retryable
    assert caught.value.http_status is None
    assert server.requests == []


# Repositories and API URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("clone_url", "expected"),
    [
        ("https://github.com/owner/repo.git", ("github.com", "owner/repo")),
        ("https://github.com/owner/repo", ("github.com", "owner/repo")),
        ("https://GitHub.com/owner/repo.git/", ("github.com", "owner/repo")),
        ("https://user:pw@gitea.example.com:3000/o/r.git", ("gitea.example.com:3000", "o/r")),
        ("http://gitea.local:3000/owner/my.repo", ("gitea.local:3000", "owner/my.repo")),
        ("git@github.com:owner/repo.git", ("github.com", "owner/repo")),
        ("git@gitlab.com:group/sub/repo.git", ("gitlab.com", "group/sub/repo")),
        ("gitlab.example.com:group/repo", ("gitlab.example.com", "group/repo")),
        (
            "ssh://git@gitlab.example.com:2222/group/sub/repo.git",
            ("gitlab.example.com", "group/sub/repo"),
        ),
        ("git://example.com/owner/repo.git", ("example.com", "owner/repo")),
        ("https://gitlab.com/a/b/c/d/repo.git", ("gitlab.com", "a/b/c/d/repo")),
        ("https://[::1]:8443/owner/repo.git", ("[::1]:8443", "owner/repo")),
    ],
)
def test_repository_path(clone_url, expected):
    assert repository_path(clone_url) == expected


@pytest.mark.parametrize(
    "clone_url",
    [
        "",
        "https://github.com/owner",
        "https://github.com/owner/.git",
        "https://github.com//repo",
        "https://github.com/owner/../repo",
        "ftp://example.com/owner/repo",
        "github.com/owner/repo",
        "https://github.com:99999/owner/repo",
        "/srv/git/repo.git",
    ],
)
def test_repository_path_refuses_what_is_no_clone_url(clone_url):
    with pytest.raises(ValueError, match=r"clone URL|owner/repository"):
        repository_path(clone_url)


def test_refusing_a_clone_url_never_shows_its_credentials():
    with pytest.raises(ValueError, match="owner/repository") as caught:
        repository_path(f"https://x-access-token:{TOKEN}@github.com/owner")
    assert TOKEN not in str(caught.value)
    assert "https://[credentials]@github.com/owner" in str(caught.value)
    with pytest.raises(ValueError, match="API URL") as caught:
        post_status(GITHUB, f"ftp://u:{TOKEN}@x", "o/r", SHA, "pending", context="c", token="t")
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("forge", "clone_url", "expected"),
    [
        (GITHUB, "https://github.com/owner/repo.git", "https://api.github.com"),
        (GITHUB, "git@github.com:owner/repo.git", "https://api.github.com"),
        (GITHUB, "https://ghe.example.com/owner/repo.git", "https://ghe.example.com/api/v3"),
        (GITHUB, "git@ghe.example.com:owner/repo.git", "https://ghe.example.com/api/v3"),
        (GITHUB, "https://acme.ghe.com/owner/repo.git", "https://api.acme.ghe.com"),
        (GITLAB, "https://gitlab.com/group/sub/repo.git", "https://gitlab.com"),
        (GITLAB, "ssh://git@gitlab.example.com:2222/g/r.git", "https://gitlab.example.com"),
        (GITEA, "https://codeberg.org/owner/repo.git", "https://codeberg.org"),
        (GITEA, "http://gitea.local:3000/owner/repo.git", "http://gitea.local:3000"),
        (GITEA, "git@gitea.local:owner/repo.git", "https://gitea.local"),
    ],
)
def test_default_api_url(forge, clone_url, expected):
    assert default_api_url(forge, clone_url) == expected


def test_default_api_url_refuses_a_nested_path_outside_gitlab_and_unknown_forges():
    with pytest.raises(ValueError, match="owner/repo"):
        default_api_url(GITHUB, "https://github.com/group/sub/repo")
    with pytest.raises(ValueError, match="unknown forge"):
        default_api_url("bitbucket", "https://bitbucket.org/owner/repo")


def test_default_api_url_and_repository_path_post_to_the_right_place(server):
    api = default_api_url(GITLAB, f"{server.url}/group/sub/repo.git")
    _, path = repository_path(f"{server.url}/group/sub/repo.git")

    assert post_status(GITLAB, api, path, SHA, "success", context="c", token=TOKEN) == 201
    assert server.requests[0].path == f"/api/v4/projects/group%2Fsub%2Frepo/statuses/{SHA}"


# Build statuses -------------------------------------------------------------------------------


def test_the_table_maps_every_build_status_to_a_state_each_forge_takes():
    assert set(status_api.FORGE_STATES) == set(BuildStatus.values)
    for status in BuildStatus:
        for forge in (GITHUB, GITEA, GITLAB):
            state = forge_state(forge, status)
            assert state in status_api.FORGE_STATE_VALUES[forge]
            # A build that has ended never leaves a forge waiting on it.
            assert (state not in ("pending", "running")) == (status in BUILD_FINAL)


def test_forge_states():
    assert [forge_state(GITHUB, s) for s in BuildStatus.values] == [
        "pending", "pending", "pending", "success", "failure", "error", "error",
    ]  # fmt: skip
    assert [forge_state(GITEA, s) for s in BuildStatus.values] == [
        "pending", "pending", "pending", "success", "failure", "error", "error",
    ]  # fmt: skip
    assert [forge_state(GITLAB, s) for s in BuildStatus.values] == [
        "pending", "running", "running", "success", "failed", "canceled", "failed",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown build status"):
        forge_state(GITHUB, "PAUSED")


def test_describe():
    assert describe(BuildStatus.QUEUED) == "queued"
    assert describe("RUNNING", 30) == "running"  # no duration before the end
    assert describe(BuildStatus.SUCCEEDED) == "succeeded"
    assert describe(BuildStatus.SUCCEEDED, timedelta(seconds=62.4)) == "succeeded in 1m 2s"
    assert describe(BuildStatus.FAILED, 3605) == "failed after 1h 0m 5s"
    assert describe(BuildStatus.CANCELED, 0.2) == "canceled after 0s"
    assert describe(BuildStatus.QUEUE_TIMEOUT, 600) == "no agent took it within 10m 0s"
    for status in BuildStatus:
        assert len(describe(status, timedelta(days=3))) <= status_api.DESCRIPTION_MAX
