"""Build retry on real agents: the failed job and what follows run again, with the variables
the build had; what succeeded is kept."""

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from builds import services
from builds.models import JobRun, StepRun
from tests.support import make_pipeline, wait_for_build

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


def test_retry_reruns_the_failed_jobs_with_the_builds_variables():
    pipeline = make_pipeline(
        "retried",
        """
variables: {WHO: nobody}
stages:
  - name: build
    jobs:
      - {id: ok, steps: [{run: 'echo "ok $WHO"'}]}
      - {id: flaky, steps: [{run: 'echo "try $CI_STEP_ATTEMPT"; test "$CI_STEP_ATTEMPT" -ge 2'}]}
  - name: after
    jobs:
      - {id: last, steps: [{run: 'echo "after $WHO"'}]}
""",
    )
    build = wait_for_build(services.trigger_build(pipeline, {"WHO": "world"}))
    assert build.status == "FAILED"
    assert JobRun.objects.get(build=build, key="last").status == "SKIPPED"

    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("ops"))
    response = client.post(f"/api/builds/{build.pk}/retry/", {"failed_only": True}, format="json")
    assert response.status_code == 202, response.json()
    assert response.json()["attempt"] == 2
    build = wait_for_build(build, timeout=60)
    assert (build.status, build.attempt) == ("SUCCEEDED", 2)
    jobs = {j.key: j for j in JobRun.objects.filter(build=build)}
    assert (jobs["ok"].status, jobs["ok"].attempt) == ("SUCCEEDED", 1)  # kept, not re-run
    assert (jobs["flaky"].status, jobs["flaky"].attempt) == ("SUCCEEDED", 2)
    flaky_step = StepRun.objects.get(job=jobs["flaky"])
    assert "try 2" in services.step_log(flaky_step)
    assert "try 1" in services.step_log(flaky_step, attempt=1)  # the first attempt's log stays
    assert "after world" in services.step_log(StepRun.objects.get(job=jobs["last"]))


def test_a_step_retry_goes_on_in_the_workspace_its_agent_kept(dedicated):
    """Two agents could take the retried job: it goes to the one keeping the failed job's
    workspace, where the retried step finds what step 0 made, and step 0 is not run again.
    (Three builds: by chance alone, all three would land right one time in four.)"""
    dedicated("agent-k1", "keeper")
    dedicated("agent-k2", "keeper")
    pipeline = make_pipeline(
        "kept-workspace",
        """
stages:
  - name: only
    jobs:
      - id: j
        runs-on: keeper
        steps:
          - run: echo "made by $CI_BUILD_NUMBER" > out
          - run: cat out && test "$CI_STEP_ATTEMPT" -ge 2
""",
    )
    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("ops"))
    for _ in range(3):
        build = wait_for_build(services.trigger_build(pipeline))
        assert build.status == "FAILED"
        job = JobRun.objects.get(build=build)
        assert job.kept_workspace_on == job.agent
        first, second = StepRun.objects.filter(job=job).order_by("index")
        response = client.post(f"/api/builds/{build.pk}/steps/{second.pk}/retry/")
        assert response.status_code == 202, response.json()
        assert wait_for_build(build, timeout=60).status == "SUCCEEDED"
        retried = JobRun.objects.get(pk=job.pk)
        assert (retried.agent, retried.kept_workspace_on) == (job.agent, "")
        first.refresh_from_db()
        assert first.attempt == 1  # not run again
        assert f"made by {build.number}" in services.step_log(StepRun.objects.get(pk=second.pk))
