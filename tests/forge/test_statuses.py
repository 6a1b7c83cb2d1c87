"""Commit statuses (forge.services.statuses) through the real PostgreSQL and a real HTTP
server standing in for each forge: the row a build owes with its trigger, the documented
request, the states that follow the build, backoff, Retry-After, answers that give a state
up, the claim that keeps two controllers from posting one row twice, and the token kept out
of every error."""

import threading
from datetime import timedelta

import pytest
import time_machine
from django.conf import settings
from django.db import connection
from django.utils import timezone

from builds.models import Build
from forge.models import CommitStatus
from forge.services import repositories, runs, statuses
from tests.forge.statusserver import Answer, StatusServer
from tests.support import make_pipeline
from vault import services as vault

pytestmark = pytest.mark.django_db

# No agent serves "unit-tests": the builds' jobs never run; a test moves the build's status.
DEFINITION = """
stages:
  - name: s
    jobs:
      - {id: j, runs-on: unit-tests, steps: [{run: "true"}]}
"""
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "tok-s3cr3t-4f9a2c"
FORGES = ["github", "gitea", "gitlab"]

# What each forge's API documents: the path (with the commit), and the token's header.
ENDPOINTS = {
    "github": (f"/repos/o/r/statuses/{SHA}", "authorization", f"Bearer {TOKEN}"),
    "gitea": (f"/api/v1/repos/o/r/statuses/{SHA}", "authorization", f"token {TOKEN}"),
    "gitlab": (f"/api/v4/projects/o%2Fr/statuses/{SHA}", "private-token", TOKEN),
}
# The forge's state for each build status these tests reach.
STATES = {
    "github": {"RUNNING": "pending", "SUCCEEDED": "success", "FAILED": "failure"},
    "gitea": {"RUNNING": "pending", "SUCCEEDED": "success", "FAILED": "failure"},
    "gitlab": {"RUNNING": "running", "SUCCEEDED": "success", "FAILED": "failed"},
}


@pytest.fixture
def server():
    with StatusServer() as running:
        yield running


def pipeline_for(forge: str, server: StatusServer, status_secret="STATUS_TOKEN", name=""):
    pipeline = make_pipeline(name or f"status-{forge}", DEFINITION)
    vault.set_secret(pipeline, "STATUS_TOKEN", TOKEN)
    repositories.set_repository(
        pipeline,
        {
            "forge": forge,
            "clone_url": "https://forge.example/o/r.git",
            "api_url": server.url,
            "status_secret": status_secret,
        },
    )
    return pipeline


def new_build(pipeline) -> Build:
    return runs.run_now(pipeline, sha=SHA, branch="main").build


def set_status(build: Build, status: str) -> None:
    """As the build's progress would leave it."""
    Build.objects.filter(pk=build.pk).update(status=status)


def row_of(build: Build) -> CommitStatus:
    return CommitStatus.objects.get(build=build)


def posted_states(server: StatusServer) -> list[str]:
    return [request.json["state"] for request in server.requests]


@pytest.mark.parametrize("forge", FORGES)
def test_a_build_posts_its_states_as_each_forge_documents(server, forge):
    pipeline = pipeline_for(forge, server)
    build = new_build(pipeline)
    assert build.status == "RUNNING"  # admitted at once: its jobs wait for an agent
    row = row_of(build)  # made in the trigger's transaction
    assert (row.delivered, row.done, row.attempts) == ("", False, 0)
    assert row.next_attempt_at <= timezone.now()
    assert statuses.due() == [row.pk]

    assert statuses.deliver(row.pk) is True
    [request] = server.wait_for_requests(1)
    path, header, credential = ENDPOINTS[forge]
    assert (request.method, request.path) == ("POST", path)
    assert request.headers[header] == credential
    if forge == "gitlab":
        assert "authorization" not in request.headers  # only its documented header
    else:
        assert "private-token" not in request.headers
    if forge == "github":
        assert request.headers["accept"] == "application/vnd.github+json"
        assert request.headers["x-github-api-version"] == "2022-11-28"
    target = f"{settings.PUBLIC_URL}/admin/builds/build/{build.pk}/change/"
    expected = {
        "state": STATES[forge]["RUNNING"],
        "target_url": target,
        "description": "running",
    }
    if forge == "gitlab":
        expected |= {"name": f"ciproject/{pipeline.name}", "ref": "main"}
    else:
        expected |= {"context": f"ciproject/{pipeline.name}"}
    assert request.json == expected
    row.refresh_from_db()
    assert (row.delivered, row.done, row.last_state, row.last_http_status) == (
        "RUNNING", False, STATES[forge]["RUNNING"], 201,
    )  # fmt: skip
    assert statuses.due() == []  # nothing changed since
    assert statuses.deliver_due() == 0
    assert len(server.requests) == 1

    set_status(build, "SUCCEEDED")
    assert statuses.deliver_due() == 1
    requests = server.wait_for_requests(2)
    assert requests[1].path == path
    assert requests[1].json["state"] == STATES[forge]["SUCCEEDED"]
    assert requests[1].json["description"] == "succeeded"
    row.refresh_from_db()
    assert (row.delivered, row.done, row.attempts, row.last_error) == ("SUCCEEDED", True, 0, "")
    assert statuses.deliver_due() == 0
    assert len(server.requests) == 2


def test_a_server_error_is_retried_after_a_backoff(server):
    pipeline = pipeline_for("github", server)
    build = new_build(pipeline)
    row = row_of(build)
    server.answer(Answer(500, {"message": f"upstream broke on {TOKEN}"}), Answer(201))
    assert statuses.deliver(row.pk) is False
    row.refresh_from_db()
    assert (row.delivered, row.done, row.attempts, row.last_http_status) == ("", False, 1, 500)
    assert "500" in row.last_error
    assert TOKEN not in row.last_error  # the forge echoed it: scrubbed
    assert row.next_attempt_at > timezone.now()
    assert row.next_attempt_at - row.last_attempt_at == timedelta(seconds=2)
    assert statuses.deliver_due() == 0  # still waiting
    assert statuses.deliver(row.pk) is False
    assert len(server.requests) == 1

    with time_machine.travel(row.next_attempt_at + timedelta(seconds=1), tick=False):
        assert statuses.deliver_due() == 1
    assert posted_states(server) == ["pending", "pending"]
    row.refresh_from_db()
    assert (row.delivered, row.attempts, row.last_http_status, row.last_error) == (
        "RUNNING", 0, 201, "",
    )  # fmt: skip


def test_a_rate_limit_waits_for_retry_after(server):
    build = new_build(pipeline_for("gitea", server))
    row = row_of(build)
    server.answer(Answer(429, {"message": "slow down"}, headers={"Retry-After": "7"}))
    assert statuses.deliver(row.pk) is False
    row.refresh_from_db()
    assert (row.attempts, row.last_http_status, row.delivered) == (1, 429, "")
    assert row.next_attempt_at - row.last_attempt_at == timedelta(seconds=7)
    with time_machine.travel(row.last_attempt_at + timedelta(seconds=6), tick=False):
        assert statuses.deliver_due() == 0
    assert len(server.requests) == 1


@pytest.mark.parametrize("forge", FORGES)
def test_an_unauthorized_answer_gives_the_state_up_and_a_later_one_is_posted(server, forge):
    build = new_build(pipeline_for(forge, server))
    row = row_of(build)
    server.answer(Answer(401, {"message": f"Bad credentials: {TOKEN}"}), Answer(201))
    assert statuses.deliver(row.pk) is False
    row.refresh_from_db()
    # Not retried: the same request would get the same answer.
    assert (row.delivered, row.done, row.attempts, row.last_http_status) == (
        "RUNNING", False, 0, 401,
    )  # fmt: skip
    assert "401" in row.last_error
    assert TOKEN not in row.last_error
    assert row.last_state == STATES[forge]["RUNNING"]
    assert statuses.due() == []
    with time_machine.travel(timezone.now() + timedelta(minutes=10), tick=False):
        assert statuses.deliver_due() == 0
    assert len(server.requests) == 1

    set_status(build, "FAILED")
    assert statuses.deliver_due() == 1
    assert posted_states(server) == [STATES[forge]["RUNNING"], STATES[forge]["FAILED"]]
    row.refresh_from_db()
    assert (row.delivered, row.done, row.last_http_status, row.last_error) == (
        "FAILED", True, 201, "",
    )  # fmt: skip


def test_a_new_state_gets_its_own_tries(server):
    """The tries a state used do not count against the next: a final state is not given up
    at its first failure because the one before it failed many times."""
    build = new_build(pipeline_for("github", server))
    row = row_of(build)
    server.answer(Answer(503, {"message": "down"}))
    for attempt in range(1, statuses.MAX_ATTEMPTS):
        with time_machine.travel(row.next_attempt_at, tick=False):
            assert statuses.deliver(row.pk) is False
        row.refresh_from_db()
        assert (row.attempts, row.delivered) == (attempt, "")
    set_status(build, "SUCCEEDED")
    with time_machine.travel(row.next_attempt_at, tick=False):
        assert statuses.deliver(row.pk) is False
    row.refresh_from_db()
    assert posted_states(server)[-1] == "success"
    assert (row.delivered, row.done, row.attempts) == ("", False, 1)  # retried, not given up
    assert row.next_attempt_at - row.last_attempt_at == timedelta(seconds=2)


def test_a_missing_status_token_gives_up_without_a_request(server):
    pipeline = pipeline_for("github", server)
    build = new_build(pipeline)
    vault.delete_secret(pipeline, "STATUS_TOKEN")
    row = row_of(build)
    assert statuses.deliver(row.pk) is False
    row.refresh_from_db()
    assert server.requests == []
    assert "STATUS_TOKEN" in row.last_error
    assert row.delivered == "RUNNING"  # given up: no try would find it
    assert row.last_http_status is None  # no forge answered


def test_a_repository_without_status_secret_owes_nothing(server):
    pipeline = pipeline_for("github", server, status_secret="")
    new_build(pipeline)
    assert not CommitStatus.objects.exists()
    assert statuses.deliver_due() == 0
    assert server.requests == []


def test_a_claimed_row_is_not_posted_by_another_controller(server):
    row = row_of(new_build(pipeline_for("gitlab", server)))
    assert statuses._claim(row.pk) is not None  # another controller took it
    assert statuses.deliver(row.pk) is False
    assert statuses.deliver_due() == 0
    assert server.requests == []
    row.refresh_from_db()
    assert (row.delivered, row.attempts) == ("", 0)


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_deliveries_of_a_row_post_it_once():
    with StatusServer() as server:
        server.answer(Answer(hang=True))  # the first post is in flight until the server stops
        row = row_of(new_build(pipeline_for("github", server)))
        results = []

        def first_controller():
            try:
                results.append(statuses.deliver(row.pk))
            finally:
                connection.close()

        thread = threading.Thread(target=first_controller)
        thread.start()
        server.wait_for_requests(1)
        second = statuses.deliver(row.pk)  # a second controller, meanwhile
        swept = statuses.deliver_due()
    # Leaving the server ended the hanging answer without a response.
    thread.join(timeout=20)
    assert (second, swept) == (False, 0)
    assert not thread.is_alive()
    assert results == [False]  # its post got no answer: retried later
    assert len(server.requests) == 1
    row.refresh_from_db()
    assert (row.delivered, row.attempts, row.last_http_status) == ("", 1, None)
    assert "could not reach" in row.last_error
