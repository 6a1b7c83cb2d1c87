"""Trigger-to-first-step-start latency with warm agents (`make bench`).

Each build is triggered through the REST API (in process, token auth) while the agents
idle; the latency is from just before the request to the step's recorded start on the
agent. Target: p50 under 50 ms, p99 under 200 ms."""

import statistics
from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from builds.models import StepRun
from tests.support import make_pipeline, one_step, wait_for_build, wait_until

BUILDS = 200


@pytest.mark.django_db(transaction=True)
def test_trigger_to_first_step_latency(workers):
    pipeline = make_pipeline("bench-latency", one_step("true"))
    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("bench"))
    latencies, answers = [], []
    for n in range(BUILDS + 10):
        started = datetime.now(UTC)
        response = client.post(f"/api/pipelines/{pipeline.pk}/builds/", {}, format="json")
        answered = datetime.now(UTC)
        assert response.status_code == 201
        build_id = response.json()["id"]
        step_start = wait_until(
            lambda build_id=build_id: (
                StepRun.objects.filter(job__build_id=build_id, started_at__isnull=False)
                .values_list("started_at", flat=True)
                .first()
            ),
            timeout=30,
            # The agent records the start: polling more often would only load the machine.
            interval=0.02,
        )
        if n >= 10:  # the first builds warm connections and caches up
            latencies.append((step_start - started).total_seconds() * 1000)
            answers.append((answered - started).total_seconds() * 1000)
        wait_for_build(build_id)
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"\ntrigger-to-first-step-start over {len(latencies)} builds: "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms "
        "(targets: p50 < 50 ms, p99 < 200 ms)"
        f"\n  of which the API's answer (trigger, commit, publish): p50"
        f" {statistics.median(answers):.1f} ms"
    )
