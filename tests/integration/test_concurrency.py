"""Concurrency policies with real agents and controller: a race of triggers from several
processes, the queue draining in FIFO order, a cancel freeing a slot, and the step retry
that bypasses a full queue."""

import json
import subprocess
import sys

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from builds import services
from builds.models import Build, JobRun, StepRun
from concurrency.errors import PipelineQueueFull
from concurrency.models import ConcurrencyPolicy
from tests.support import make_pipeline, wait_for_build, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]

TRIGGER_SCRIPT = """
import json, os, sys, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ciproject.settings")
django.setup()
from builds import services
from builds.models import Pipeline
from ciproject.errors import CIError
pipeline = Pipeline.objects.get(name=sys.argv[1])
outcome = {"created": [], "refused": []}
for _ in range(int(sys.argv[2])):
    try:
        outcome["created"].append(services.trigger_build(pipeline).number)
    except CIError as exc:
        outcome["refused"].append(exc.code)
print(json.dumps(outcome))
"""


def gated(name: str, gate, policy: ConcurrencyPolicy, first_step: str = "true"):
    """A pipeline whose build holds its agent until the file `gate` exists."""
    pipeline = make_pipeline(
        name,
        f"""
stages:
  - name: work
    jobs:
      - id: fast
        runs-on: linux
        steps: [{{name: first, run: {first_step!r}}}]
      - id: slow
        runs-on: linux
        steps: [{{name: wait, run: 'until [ -f {gate} ]; do sleep 0.05; done'}}]
""",
    )
    pipeline.policy = policy
    pipeline.save()
    return pipeline


def max_overlap(builds) -> int:
    """The most builds that were RUNNING at one instant, from their start and end times."""
    events = sorted(
        [(b.started_at, 1) for b in builds] + [(b.finished_at, -1) for b in builds],
        key=lambda event: (event[0], event[1]),
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_a_race_of_200_triggers_from_several_processes(worker_env, tmp_path):
    gate = tmp_path / "gate"
    policy = ConcurrencyPolicy.objects.create(
        name="race", max_running=2, queue_length=5, queue_timeout=600
    )
    gated("race", gate, policy)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRIGGER_SCRIPT, "race", "50"],
            env=worker_env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    created = sorted(n for outcome in outcomes for n in outcome["created"])
    refused = [code for outcome in outcomes for code in outcome["refused"]]
    assert created == list(range(1, 8))
    assert refused == ["PIPELINE_QUEUE_FULL"] * 193
    builds = Build.objects.filter(pipeline__name="race")
    assert builds.filter(status="RUNNING").count() == 2
    assert builds.filter(status="QUEUED").count() == 5

    gate.touch()  # let them all run: the queue drains two at a time, oldest first
    wait_until(lambda: builds.filter(status="SUCCEEDED").count() == 7, timeout=120)
    done = list(builds)
    assert max_overlap(done) <= 2
    queued = sorted((b for b in done if b.enqueued_at), key=lambda b: b.enqueued_at)
    assert [b.pk for b in queued] == [b.pk for b in sorted(queued, key=lambda b: b.started_at)]


def test_cancelling_a_running_build_starts_the_next_queued_one(tmp_path):
    policy = ConcurrencyPolicy.objects.create(name="one", max_running=1, queue_length=5)
    pipeline = gated("one", tmp_path / "never", policy)
    first, second = services.trigger_build(pipeline), services.trigger_build(pipeline)
    assert second.status == "QUEUED"
    wait_until(lambda: JobRun.objects.filter(build=first, key="slow", status="RUNNING").exists())
    services.request_cancel(first.pk)
    assert wait_for_build(first, timeout=20).status == "CANCELED"
    wait_until(
        lambda: Build.objects.get(pk=second.pk).status == "RUNNING",
        timeout=10,
        message="the queued build to start",
    )
    services.request_cancel(second.pk)
    assert wait_for_build(second, timeout=20).status == "CANCELED"


def test_the_concrete_case_with_real_agents(tmp_path):
    """max_running 1, queue_length 2, queue_timeout 60 s: A runs a job that fails fast and
    one that waits; B and C fill the queue; retrying A's failed step starts at once and
    never answers PIPELINE_QUEUE_FULL; B and C stay queued in order; D is refused."""
    gate = tmp_path / "gate"
    policy = ConcurrencyPolicy.objects.create(
        name="concrete", max_running=1, queue_length=2, queue_timeout=60
    )
    pipeline = gated("concrete", gate, policy, first_step='test "$CI_STEP_ATTEMPT" -ge 2')
    a = services.trigger_build(pipeline)
    b, c = services.trigger_build(pipeline), services.trigger_build(pipeline)
    wait_until(
        lambda: JobRun.objects.filter(build=a, key="fast", status="FAILED").exists(),
        message="A's fast job to fail",
    )
    failed = StepRun.objects.get(job__build=a, job__key="fast")
    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("ops"))
    response = client.post(f"/api/builds/{a.pk}/steps/{failed.pk}/retry/")
    assert response.status_code == 202, response.json()
    assert response.json()["attempt"] == 2
    retried = wait_until(
        lambda: StepRun.objects.filter(pk=failed.pk, status="SUCCEEDED").first(),
        timeout=20,
        message="the retried step to run",
    )
    assert retried.attempt == 2
    assert [Build.objects.get(pk=x.pk).status for x in (a, b, c)] == [
        "RUNNING",
        "QUEUED",
        "QUEUED",
    ]
    with pytest.raises(PipelineQueueFull):
        services.trigger_build(pipeline)
    gate.touch()
    assert wait_for_build(a, timeout=30).status == "SUCCEEDED"
    # B and C then run in order (their own first attempt of `fast` fails, as A's did).
    assert wait_for_build(b, timeout=30).status == "FAILED"
    assert wait_for_build(c, timeout=30).status == "FAILED"
    b, c = Build.objects.get(pk=b.pk), Build.objects.get(pk=c.pk)
    assert b.started_at < c.started_at
    assert max_overlap([Build.objects.get(pk=a.pk), b, c]) == 1


def test_queued_builds_start_by_priority_then_in_order(tmp_path):
    gate = tmp_path / "gate"
    policy = ConcurrencyPolicy.objects.create(name="prio", max_running=1, queue_length=10)
    pipeline = gated("prio", gate, policy)
    pipeline.definition = "max-priority: 5\n" + pipeline.definition
    services.save_pipeline(pipeline.name, pipeline.definition, pipeline=pipeline)
    first = services.trigger_build(pipeline)
    queued = [services.trigger_build(pipeline, priority=p) for p in (0, 5, 2, 5, 0)]
    assert {b.status for b in queued} == {"QUEUED"}
    gate.touch()  # each build passes the gate at once: the queue drains one at a time
    for build in [first, *queued]:
        wait_for_build(build, timeout=60)
    by_start = sorted(queued, key=lambda b: Build.objects.get(pk=b.pk).started_at)
    assert [(b.priority, b.number) for b in by_start] == [(5, 3), (5, 5), (2, 4), (0, 2), (0, 6)]
