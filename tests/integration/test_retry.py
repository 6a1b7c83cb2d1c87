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
