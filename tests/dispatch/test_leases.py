"""Agent leases on the database and the broker: which jobs a leased agent is sent."""

import json

import pytest
import redis

from agents import services
from builds import services as builds
from builds.models import JobRun, StepRun
from ciproject.protocol import agent_queue
from tests.conftest import TEST_BROKER_URL
from tests.support import make_pipeline

TWO_LEASES = """
stages:
  - name: a
    jobs:
      - {id: make1, runs-on: unit-tests, steps: [{run: x}]}
      - {id: make2, runs-on: unit-tests, steps: [{run: x}]}
  - name: b
    jobs:
      - {id: use1, reuse: make1, steps: [{run: y}]}
      - {id: use2, reuse: make2, steps: [{run: y}]}
"""


def sent_to(agent: str) -> list[str]:
    """The task ids (job-<id>-<attempt>) waiting in the agent's own queue."""
    messages = redis.Redis.from_url(TEST_BROKER_URL).lrange(agent_queue(agent), 0, -1)
    return sorted(json.loads(m)["headers"]["id"] for m in messages)


@pytest.fixture
def agent_queues():
    broker = redis.Redis.from_url(TEST_BROKER_URL)
    names = [agent_queue("a1"), agent_queue("a2")]
    broker.delete(*names)
    yield
    broker.delete(*names)


@pytest.mark.django_db
@pytest.mark.usefixtures("agent_queues")
def test_a_retried_lease_taking_job_is_not_pulled_to_another_leased_agent(
    django_capture_on_commit_callbacks,
):
    for name in ("a1", "a2"):
        services.register_agent(name, "host", ["unit-tests"], 1, "1")
    build = builds.trigger_build(make_pipeline("two-leases", TWO_LEASES))
    jobs = {job.key: job for job in JobRun.objects.filter(build=build)}
    make2 = builds.start_job(jobs["make2"].pk, 1, "a2")  # a2 leased to the build
    step = StepRun.objects.get(job=make2)
    step.job = make2
    builds.start_step(step)
    builds.finish_step(step, step.attempt, "FAILED", 1, {})
    builds.finish_job(make2, "FAILED", "step failed")
    assert builds.advance_build(build.pk) == "RUNNING"  # make1 has not run yet
    with django_capture_on_commit_callbacks(execute=True):
        builds.retry_step(build.pk, step.pk)  # make2 runs again on a2, in its workspace
        builds.start_job(jobs["make1"].pk, 1, "a1")  # a1 leased too: pulls the build's jobs
    make2.refresh_from_db()
    assert (make2.status, make2.attempt, make2.agent) == ("QUEUED", 2, "a2")
    assert f"job-{make2.pk}-2" in sent_to("a2")
    assert f"job-{make2.pk}-2" not in sent_to("a1")  # it must run on a2 only
