"""Helpers for tests: waiting on a condition with a deadline, and common pipelines."""

import os
import time

import psycopg
import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from rest_framework.test import APIClient

from builds import services
from builds.models import Build, JobRun, StepRun
from builds.statuses import BUILD_FINAL
from tokens import services as tokens
from tokens.models import ACTIONS


def wait_until(predicate, timeout: float = 30, interval: float = 0.05, message=""):
    """Poll `predicate` until it returns something truthy, or fail after `timeout` s.
    `message` says what was awaited; a callable is asked at the failure (to show the state
    that was left)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) until its parent reaps it: read its state.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_build(build: Build | int, timeout: float = 60) -> Build:
    """Wait until the build is final; return it fresh from the database."""
    build_id = getattr(build, "pk", build)

    def final():
        fresh = Build.objects.get(pk=build_id)
        return fresh if fresh.status in BUILD_FINAL else None

    return wait_until(final, timeout, message=f"build {build_id} to finish")


def make_pipeline(name: str, definition: str):
    return services.save_pipeline(name, definition)


def one_step(run: str, runs_on: str = "default", variables: str = "") -> str:
    """A definition of one stage with one job `j` of one step, and `variables` (names
    separated by spaces, each defaulting to ""), which a trigger may then set."""
    job = f"{{id: j, runs-on: {runs_on}, steps: [{{run: {run!r}}}]}}"
    defaults = ", ".join(f"{name}: ''" for name in variables.split())
    head = f"variables: {{{defaults}}}\n" if defaults else ""
    return f"{head}stages:\n  - name: s\n    jobs:\n      - {job}\n"


def raw_connection():
    """A second, independent connection to the test database."""
    db = settings.DATABASES["default"]
    return psycopg.connect(
        host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"],
        autocommit=True,
    )  # fmt: skip


# No agent serves "unit-tests": these builds' job messages are never run.
PARALLEL = """
stages:
  - name: s
    jobs:
      - {id: fast, runs-on: unit-tests, steps: [{run: "exit 1"}]}
      - {id: slow, runs-on: unit-tests, steps: [{run: "sleep 60"}]}
  - name: t
    jobs:
      - {id: last, runs-on: unit-tests, steps: [{run: "true"}]}
"""


# Job `use` must run on the agent that ran `make` (which leases it to the build).
REUSE = """
stages:
  - name: a
    jobs:
      - {id: make, runs-on: unit-tests, steps: [{run: x}]}
  - name: b
    jobs:
      - {id: use, reuse: make, steps: [{run: y}]}
"""


def running_job(build, key: str) -> JobRun:
    """As an agent starting it would leave it: job `key` RUNNING on an agent."""
    job = JobRun.objects.get(build=build, key=key)
    JobRun.objects.filter(pk=job.pk).update(status="RUNNING", agent="a1", started_at=timezone.now())
    job.refresh_from_db()
    return job


def fail_fast_job(build) -> StepRun:
    """As an agent would record it: job `fast` ran and failed."""
    job = JobRun.objects.get(build=build, key="fast")
    JobRun.objects.filter(pk=job.pk).update(status="FAILED", started_at=timezone.now())
    step = job.steps.get()
    StepRun.objects.filter(pk=step.pk).update(
        status="FAILED", exit_code=1, started_at=timezone.now()
    )
    return step


def user_with(*perms: str) -> User:
    user = User.objects.create_user(f"user{User.objects.count()}")
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def api_token(user, *, actions=ACTIONS, **options) -> str:
    """The value of a new API token of `user`'s: every action unless told (so what a test
    checks is the user's rights), or `actions`, and create_token's other options."""
    name = options.pop("name", f"test-{user.api_tokens.count()}")
    return tokens.create_token(user, name, actions=actions, **options)[1]


def client_for(*perms: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(user_with(*perms))}")
    return client
