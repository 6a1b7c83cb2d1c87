"""A job's own `timeout`: all its steps together, automatic retries included, on real agents."""

import pytest

from builds import services
from builds.models import JobRun, StepRun
from tests.support import make_pipeline, wait_for_build

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


def test_the_job_timeout_ends_the_step_that_runs_out_of_it_and_skips_the_rest():
    pipeline = make_pipeline(
        "job-timeout",
        """
stages:
  - name: s
    jobs:
      - id: j
        runs-on: linux
        timeout: 3
        steps:
          - {name: first, run: sleep 1}
          - {name: second, run: sleep 600, timeout: 600}
          - {name: third, run: 'true'}
""",
    )
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "FAILED"
    job = JobRun.objects.get(build=build)
    assert job.status == "TIMED_OUT"
    assert job.reason == "step 'second' ended TIMED_OUT: the job's timeout of 3 s ran out"
    steps = {step.name: step for step in StepRun.objects.filter(job=job)}
    assert [steps[n].status for n in ("first", "second", "third")] == [
        "SUCCEEDED", "TIMED_OUT", "SKIPPED",
    ]  # fmt: skip
    ran = (steps["second"].finished_at - steps["first"].started_at).total_seconds()
    assert 3 <= ran < 10  # ended by the job's 3 s, not the step's 600
    assert "the job's timeout of 3 s ran out" in services.step_log(steps["second"])


def test_automatic_retries_stop_when_the_job_is_out_of_time():
    pipeline = make_pipeline(
        "job-timeout-retries",
        """
stages:
  - name: s
    jobs:
      - id: j
        runs-on: linux
        timeout: 2
        steps:
          - {name: flaky, run: 'sleep 0.5; exit 1', retry: 10}
""",
    )
    build = wait_for_build(services.trigger_build(pipeline))
    step = StepRun.objects.get(job__build=build)
    assert step.status in ("FAILED", "TIMED_OUT")
    assert 2 <= step.attempt <= 5  # about 2 s of 0.5 s attempts, never the 11 it may have
