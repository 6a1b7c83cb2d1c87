"""Build retry: what runs again, the variables it keeps, its concurrency policy, and the
same refusal through the API, the admin and the CLI."""

import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from builds import services
from builds.models import Build, BuildVariable, JobRun, StepRun
from concurrency.errors import PipelineQueueFull
from concurrency.models import ConcurrencyPolicy
from tests.builds.test_partitions import build_at, partition_of
from tests.support import make_pipeline, raw_connection

THREE_STAGES = """
variables:
  GREETING: hello
  WHO: nobody
stages:
  - name: one
    jobs:
      - {id: a, runs-on: unit-tests, steps: [{run: "true"}]}
      - {id: b, runs-on: unit-tests, steps: [{run: "true"}, {run: "true"}]}
  - name: two
    jobs:
      - {id: c, runs-on: unit-tests, steps: [{run: "true"}]}
"""


def ended(build, statuses: dict[str, str]) -> None:
    """As the agents would leave the build's jobs (and their steps), then the controller."""
    now = timezone.now()
    for key, status in statuses.items():
        JobRun.objects.filter(build=build, key=key).update(status=status, started_at=now)
        StepRun.objects.filter(job__build=build, job__key=key).update(status=status, started_at=now)
    assert services.advance_build(build.pk) == "FAILED"


def failed_build(pipeline=None):
    """As the agents and controller would leave it: a succeeded, b failed, c skipped."""
    build = services.trigger_build(pipeline or make_pipeline("p", THREE_STAGES), {"WHO": "me"})
    BuildVariable.objects.create(
        build=build, build_created_at=build.created_at, name="SET", value="x", source="step"
    )
    ended(build, {"a": "SUCCEEDED", "b": "FAILED"})
    return Build.objects.get(pk=build.pk)


def jobs(build):
    return {j.key: (j.status, j.attempt) for j in JobRun.objects.filter(build=build)}


@pytest.mark.django_db(transaction=True)
def test_failed_only_reruns_the_failed_jobs_and_what_follows():
    build = failed_build()
    retried = services.retry_build(build.pk, failed_only=True)
    assert (retried.status, retried.attempt, retried.finished_at) == ("RUNNING", 2, None)
    assert jobs(build) == {"a": ("SUCCEEDED", 1), "b": ("QUEUED", 2), "c": ("PENDING", 2)}
    b_steps = StepRun.objects.filter(job__build=build, job__key="b")
    assert set(b_steps.values_list("status", "attempt")) == {("PENDING", 2)}
    assert services.build_variables(build.pk) == {"GREETING": "hello", "SET": "x", "WHO": "me"}


@pytest.mark.django_db(transaction=True)
def test_a_full_retry_restores_the_triggered_values_that_steps_overwrote():
    from builds.services.execution import _upsert_variables

    build = failed_build()
    _upsert_variables(build.pk, build.created_at, {"WHO": "step", "GREETING": "a"}, "step")
    _upsert_variables(build.pk, build.created_at, {"WHO": "again"}, "step")
    assert services.build_variables(build.pk) == {"GREETING": "a", "SET": "x", "WHO": "again"}
    services.retry_build(build.pk, failed_only=False)
    assert services.build_variables(build.pk) == {"GREETING": "hello", "WHO": "me"}
    sources = dict(BuildVariable.objects.filter(build=build).values_list("name", "source"))
    assert sources == {"GREETING": "pipeline", "WHO": "trigger"}


@pytest.mark.django_db(transaction=True)
def test_all_reruns_every_job_with_the_variables_it_was_triggered_with():
    build = failed_build()
    retried = services.retry_build(build.pk, failed_only=False)
    assert retried.attempt == 2
    assert jobs(build) == {"a": ("QUEUED", 2), "b": ("QUEUED", 2), "c": ("PENDING", 2)}
    assert services.build_variables(build.pk) == {"GREETING": "hello", "WHO": "me"}
    sources = set(BuildVariable.objects.filter(build=build).values_list("source", flat=True))
    assert sources == {"pipeline", "trigger"}


@pytest.mark.django_db(transaction=True)
def test_only_finished_builds_are_retried_and_succeeded_ones_only_with_all():
    running = services.trigger_build(make_pipeline("r", THREE_STAGES))
    decision = services.can_retry(running)
    assert (decision.allowed, decision.code) == (False, "BUILD_NOT_RETRYABLE")
    Build.objects.filter(pk=running.pk).update(status="SUCCEEDED")
    done = Build.objects.get(pk=running.pk)
    assert not services.can_retry(done).allowed
    assert services.can_retry(done, include_succeeded=True).allowed
    assert services.retry_build(done.pk, failed_only=False).status == "RUNNING"


@pytest.mark.django_db(transaction=True)
def test_a_build_retry_goes_through_its_concurrency_policy():
    policy = ConcurrencyPolicy.objects.create(name="one", max_running=1, queue_length=1)
    pipeline = make_pipeline("g", THREE_STAGES)
    pipeline.policy = policy
    pipeline.save()
    build = failed_build(pipeline)
    busy, waiting = services.trigger_build(pipeline), services.trigger_build(pipeline)
    assert (busy.status, waiting.status) == ("RUNNING", "QUEUED")
    with pytest.raises(PipelineQueueFull):
        services.retry_build(build.pk)
    fresh = Build.objects.get(pk=build.pk)
    assert (fresh.status, fresh.attempt) == ("FAILED", 1)
    assert jobs(build)["b"] == ("FAILED", 1)  # the refusal changed nothing
    ConcurrencyPolicy.objects.filter(pk=policy.pk).update(queue_length=2)
    assert services.retry_build(build.pk).status == "QUEUED"


@pytest.mark.usefixtures("no_old_partitions")
def test_the_refusal_is_the_same_in_the_api_the_admin_and_the_cli(worker_env):
    build = build_at(timezone.now() - 60 * timedelta(days=1))
    with raw_connection() as admin:
        admin.execute(f'DROP TABLE "{partition_of(build)}"')
    reason = services.can_retry(build).reason
    assert "kept for 90 days" in reason

    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("ops", password="pw"))
    response = client.post(f"/api/builds/{build.pk}/retry/", {"failed_only": True}, format="json")
    body = response.json()
    assert (response.status_code, body["code"], body["detail"]) == (
        409,
        "RETRY_WINDOW_EXPIRED",
        reason,
    )
    assert body["created_at"] == build.created_at.isoformat()
    assert body["retention_days"] == 90
    assert body["earliest_retryable"] is not None

    browser = APIClient()
    browser.login(username="ops", password="pw")
    page = browser.get(reverse("admin:builds_build_change", args=(build.pk,))).content.decode()
    assert 'class="button retry-disabled" disabled title="' in page
    assert "Retry is not possible" in page
    posted = browser.post(reverse("admin:builds_build_retry", args=(build.pk,)), follow=True)
    assert "RETRY_WINDOW_EXPIRED" in posted.content.decode()  # the server checks again

    cli = subprocess.run(
        [sys.executable, "manage.py", "retry", str(build.pk)],
        env=worker_env,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1
    assert f"RETRY_WINDOW_EXPIRED: {reason}" in cli.stderr
    assert Build.objects.get(pk=build.pk).attempt == 1


@pytest.mark.django_db
def test_a_step_retry_gives_later_stages_that_had_run_a_new_attempt():
    """A build cancelled in stage two, its stage-one step retried: the stage-two step that
    had started runs again as attempt 2, so its new log and result never mix with the old."""
    build = services.trigger_build(make_pipeline("later", THREE_STAGES))
    started = timezone.now()
    Build.objects.filter(pk=build.pk).update(status="CANCELED", finished_at=started)
    JobRun.objects.filter(build=build).update(status="CANCELED", finished_at=started)
    StepRun.objects.filter(job__build=build).update(status="CANCELED", started_at=started)
    first = StepRun.objects.get(job__build=build, job__key="a")
    services.retry_step(build.pk, first.pk)
    later = StepRun.objects.filter(job__build=build, job__stage_index__gt=0)
    assert later.exists()
    assert {(s.status, s.attempt, s.started_at) for s in later} == {("PENDING", 2, None)}


@pytest.mark.django_db(transaction=True)
def test_failed_only_reruns_the_job_a_failed_job_reuses():
    """`then` reuses `j`'s agent and workspace, which went with the build's lease when it
    ended: retrying `then` alone would run it in an empty directory, so `j` runs again too
    (and the stage between, as everything after the first stage that runs again)."""
    pipeline = make_pipeline("reusing", REUSING)
    build = services.trigger_build(pipeline)
    ended(build, {"j": "SUCCEEDED", "other": "SUCCEEDED", "mid": "SUCCEEDED", "then": "FAILED"})
    services.retry_build(build.pk, failed_only=True)
    assert jobs(build) == {
        "j": ("QUEUED", 2),
        "other": ("SUCCEEDED", 1),
        "mid": ("PENDING", 2),
        "then": ("PENDING", 2),
    }


REUSING = """
stages:
  - name: one
    jobs:
      - {id: j, runs-on: unit-tests, steps: [{run: "true"}]}
      - {id: other, runs-on: unit-tests, steps: [{run: "true"}]}
  - name: two
    jobs:
      - {id: mid, runs-on: unit-tests, steps: [{run: "true"}]}
  - name: three
    jobs:
      - {id: then, reuse: j, steps: [{run: "true"}]}
"""


@pytest.mark.django_db(transaction=True)
def test_failed_only_leaves_a_job_its_own_condition_skipped():
    pipeline = make_pipeline(
        "conditional",
        "variables: {LINT: '0'}\nstages:\n"
        "  - name: one\n    jobs:\n"
        "      - {id: lint, if: \"vars.LINT == '1'\", runs-on: unit-tests, steps: [{run: x}]}\n"
        "      - {id: unit, runs-on: unit-tests, steps: [{run: 'true'}]}\n"
        "  - name: two\n    jobs:\n"
        "      - {id: deploy, runs-on: unit-tests, steps: [{run: 'true'}]}\n",
    )
    build = services.trigger_build(pipeline)
    assert JobRun.objects.get(build=build, key="lint").status == "SKIPPED"
    JobRun.objects.filter(build=build, key="unit").update(status="SUCCEEDED")
    JobRun.objects.filter(build=build, key="deploy").update(status="FAILED")
    Build.objects.filter(pk=build.pk).update(status="FAILED")
    services.retry_build(build.pk)
    statuses = dict(JobRun.objects.filter(build=build).values_list("key", "status"))
    assert statuses == {"lint": "SKIPPED", "unit": "SUCCEEDED", "deploy": "QUEUED"}
