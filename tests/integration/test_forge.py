"""Builds from a forge, end to end on real processes: a signed GitHub push reaches web, the
build's jobs check its exact commit out on two agents (each build node with its own mirror),
through `git http-backend` with basic auth (the clone token only in git's environment), and
the commit's statuses reach a local forge API; a second push fetches only what is new."""

import hashlib
import hmac
import json
import os
import uuid

import pytest
import requests

from builds import services
from builds.models import Build, StepRun
from forge.models import CommitStatus
from forge.services import repositories
from tests.forge.statusserver import StatusServer
from tests.gitservers import GitHttp, Repository
from tests.support import make_pipeline, wait_for_build, wait_until
from vault import services as vault

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]

CLONE_TOKEN = "clone-token-0b9f3c"
STATUS_TOKEN = "status-token-7d1e2a"
DEFINITION = """
on: {push: {branches: [main]}}
stages:
  - name: build
    jobs:
      - id: here
        runs-on: default
        steps:
          - name: commit
            run: >-
              test "$(git rev-parse HEAD)" = "$CI_COMMIT_SHA" && cat app.txt
              && test "$CI_COMMIT_BRANCH" = main && test "$CI_EVENT" = push
              && ! grep -r clone-token-0b9f3c .git && ! env | grep clone-token-0b9f3c
      - id: there
        runs-on: elsewhere
        checkout: {depth: 1}
        steps:
          - name: shallow
            run: >-
              test "$(git rev-parse HEAD)" = "$CI_COMMIT_SHA"
              && test "$(git rev-parse --is-shallow-repository)" = true && cat app.txt
"""


def push_payload(sha: str, message: str) -> bytes:
    return json.dumps(
        {
            "ref": "refs/heads/main",
            "before": "0" * 39 + "1",
            "after": sha,
            "created": False,
            "deleted": False,
            "forced": False,
            "head_commit": {"id": sha, "message": message},
            "commits": [{"id": sha, "message": message}],
            "repository": {
                "full_name": "o/app",
                "clone_url": "https://github.example/o/app.git",
            },
            "pusher": {"name": "octocat"},
        }
    ).encode()


def deliver(url: str, secret: str, body: bytes) -> requests.Response:
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": f"sha256={signature}",
    }
    return requests.post(url, data=body, headers=headers, timeout=10)


def logs(build: Build, job: str) -> str:
    steps = StepRun.objects.filter(job__build=build, job__key=job).order_by("index")
    return "".join(services.step_log(step, step.attempt) for step in steps)


def test_a_push_builds_its_commit_on_two_agents_and_reports_its_status(
    dedicated, tmp_path, worker_env
):
    dedicated(
        "agent-elsewhere",
        "elsewhere",
        env={"AGENT_MIRROR_ROOT": str(tmp_path / "mirrors-elsewhere")},
    )
    served = tmp_path / "served"
    served.mkdir()
    source = Repository(served, "o/app")
    # A blob that does not compress: what a fetch sends shows whether it sent history again.
    first = source.commit({"app.txt": "one\n", "data.bin": os.urandom(300_000)}, "first")
    source.push("main")
    with GitHttp(served, "ci", CLONE_TOKEN) as forge_git, StatusServer() as forge_api:
        pipeline = make_pipeline("from-forge", DEFINITION)
        vault.set_secret(pipeline, "CLONE_TOKEN", CLONE_TOKEN)
        vault.set_secret(pipeline, "STATUS_TOKEN", STATUS_TOKEN)
        _, secret = repositories.set_repository(
            pipeline,
            {
                "forge": "github",
                "clone_url": forge_git.url("o/app"),
                "api_url": forge_api.url,
                "clone_username": "ci",
                "clone_secret": "CLONE_TOKEN",
                "status_secret": "STATUS_TOKEN",
            },
        )
        hook = f"{worker_env['AGENT_SERVER_URL']}/api/pipelines/{pipeline.pk}/hooks/github/"

        answer = deliver(hook, secret, push_payload(first, "first"))
        assert answer.status_code == 201, answer.text
        build = wait_for_build(answer.json()["build"], 90)
        jobs = {job.key: job for job in build.jobs.all()}
        assert build.status == "SUCCEEDED", [(j.key, j.status, j.reason) for j in jobs.values()]
        assert jobs["there"].agent == "agent-elsewhere"
        assert jobs["here"].agent != "agent-elsewhere"
        assert "one" in logs(build, "here")
        assert "new mirror" in logs(build, "here")
        served_ok = [r for r in forge_git.requests if r.status == 200]
        assert served_ok
        assert all(r.credentials == ("ci", CLONE_TOKEN) for r in served_ok)
        assert CLONE_TOKEN not in logs(build, "here")

        # Its statuses: pending first, success last, on the commit, as GitHub's API has them.
        wait_until(
            lambda: CommitStatus.objects.filter(build=build, done=True).exists(),
            timeout=30,
            message="the final commit status to be delivered",
        )
        posted = [r for r in forge_api.requests if r.method == "POST"]
        assert {r.path for r in posted} == {f"/repos/o/app/statuses/{first}"}
        states = [r.json["state"] for r in posted]
        assert states[0] == "pending"
        assert states[-1] == "success"
        assert all(r.headers["authorization"] == f"Bearer {STATUS_TOKEN}" for r in posted)
        assert posted[-1].json["context"] == "ciproject/from-forge"
        assert posted[-1].json["target_url"].endswith(f"/admin/builds/build/{build.pk}/change/")

        # A second push: each node's mirror fetches only what is new.
        second = source.commit({"app.txt": "two\n"}, "second")
        source.push("main")
        fetched_before = len(forge_git.sent())
        answer = deliver(hook, secret, push_payload(second, "second"))
        assert answer.status_code == 201, answer.text
        build = wait_for_build(answer.json()["build"], 90)
        assert build.status == "SUCCEEDED", [(j.key, j.reason) for j in build.jobs.all()]
        assert "two" in logs(build, "here")
        assert "new mirror" not in logs(build, "here")
        first_fetches, later_fetches = (
            forge_git.sent()[:fetched_before],
            forge_git.sent()[fetched_before:],
        )
        assert max(first_fetches) > 300_000  # each new mirror fetched the blob
        assert later_fetches
        assert max(later_fetches) < 10_000  # the updated mirrors did not


def test_a_commit_that_cannot_be_fetched_fails_the_job_with_gits_message(tmp_path, worker_env):
    served = tmp_path / "served"
    served.mkdir()
    source = Repository(served, "lost")
    source.commit({"a.txt": "a\n"}, "a")
    source.push("main")
    with GitHttp(served, "ci", CLONE_TOKEN) as forge_git:
        pipeline = make_pipeline("unfetchable", DEFINITION.split("      - id: there")[0])
        vault.set_secret(pipeline, "CLONE_TOKEN", "wrong-token-value")
        _, secret = repositories.set_repository(
            pipeline,
            {
                "forge": "github",
                "clone_url": forge_git.url("lost"),
                "clone_username": "ci",
                "clone_secret": "CLONE_TOKEN",
            },
        )
        hook = f"{worker_env['AGENT_SERVER_URL']}/api/pipelines/{pipeline.pk}/hooks/github/"
        answer = deliver(hook, secret, push_payload(source.sha(), "a"))
        build = wait_for_build(answer.json()["build"], 60)
        job = build.jobs.get()
        assert build.status == "FAILED"
        assert job.reason.startswith("checkout: ")
        assert "wrong-token-value" not in job.reason
        assert "Authentication failed" in job.reason or "401" in job.reason, job.reason
