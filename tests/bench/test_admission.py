"""Admission figures (`make bench`): triggers per second into one hot group, into 50 groups
and into a hot group with a long history of finished builds (from one process, and into one
hot group from four at once), and the latency from a build's end to the next queued build's
first step."""

import itertools
import json
import statistics
import subprocess
import sys
import time

import pytest
from django.db import connection

from builds import services
from builds.models import Build, StepRun
from concurrency.models import ConcurrencyPolicy
from tests.integration.test_concurrency import TRIGGER_SCRIPT
from tests.support import make_pipeline, one_step, wait_until

TRIGGERS = 200
HISTORY = 50_000  # finished builds of a group: a busy pipeline's few months


def finished_history(pipeline, count: int) -> None:
    """`count` finished builds in the group of `pipeline`'s last build, copies of it."""
    columns = ", ".join(
        f.column for f in Build._meta.concrete_fields if f.column not in ("id", "number", "status")
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO builds_build (number, status, {columns})"
            f" SELECT number + g, 'SUCCEEDED', {columns} FROM builds_build,"
            " generate_series(1, %s) g WHERE id = %s",
            [count, Build.objects.filter(pipeline=pipeline).latest("id").pk],
        )
        cursor.execute(
            "UPDATE builds_pipeline SET last_build_number = last_build_number + %s WHERE id = %s",
            [count, pipeline.pk],
        )
        cursor.execute("ANALYZE builds_build")


def throughput(pipeline, variables=lambda n: None) -> float:
    started = time.perf_counter()
    for n in range(TRIGGERS):
        services.trigger_build(pipeline, variables(n))
    return TRIGGERS / (time.perf_counter() - started)


def governed(name: str, group_key: str, runs_on: str, run: str = "true"):
    policy = ConcurrencyPolicy.objects.create(
        name=name, group_key=group_key, max_running=2, queue_length=200, queue_timeout=3600
    )
    pipeline = make_pipeline(name, one_step(run, runs_on=runs_on, variables="G"))
    pipeline.policy = policy
    pipeline.save()
    return pipeline


@pytest.mark.django_db(transaction=True)
def test_admission_throughput(worker_env):
    # Jobs go to a label no agent serves: the builds stay RUNNING or QUEUED while we admit.
    hot = governed("bench-hot", "${pipeline_id}", "bench-nowhere")
    one = throughput(hot)
    spread = governed("bench-spread", "g-${G}", "bench-nowhere")
    fifty = throughput(spread, lambda n: {"G": str(n % 50)})
    # The same hot group after a long history: admission counts only the live builds.
    old = governed("bench-old", "${pipeline_id}", "bench-nowhere")
    services.trigger_build(old)
    finished_history(old, HISTORY)
    aged = throughput(old)

    parallel = governed("bench-parallel", "${pipeline_id}", "bench-nowhere")
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRIGGER_SCRIPT, "bench-parallel", str(TRIGGERS // 4)],
            env=worker_env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [json.loads(proc.communicate(timeout=300)[0]) for proc in procs]
    elapsed = time.perf_counter() - started
    admitted = sum(len(o["created"]) for o in outcomes)
    assert admitted == Build.objects.filter(pipeline=parallel).count()
    print(
        f"\nadmission, one process: {one:.0f} triggers/s into one hot group, "
        f"{fifty:.0f} triggers/s into 50 groups, {aged:.0f} triggers/s into a hot group"
        f" with {HISTORY:,} finished builds (target: >= 250/s)"
        f"\nadmission, four processes into one hot group: {TRIGGERS / elapsed:.0f} triggers/s"
        " (including the processes' start-up)"
    )


@pytest.mark.django_db(transaction=True)
def test_latency_from_a_build_end_to_the_next_queued_first_step(workers):
    pipeline = governed("bench-next", "${pipeline_id}", "linux", run="sleep 0.2")
    ConcurrencyPolicy.objects.filter(name="bench-next").update(max_running=1)
    builds = [services.trigger_build(pipeline) for _ in range(31)]
    wait_until(
        lambda: not Build.objects.filter(pipeline=pipeline).exclude(status="SUCCEEDED").exists(),
        timeout=120,
    )
    latencies = []
    for previous, following in itertools.pairwise(builds):
        ended = Build.objects.get(pk=previous.pk).finished_at
        first_step = StepRun.objects.get(job__build=following).started_at
        latencies.append((first_step - ended).total_seconds() * 1000)
    latencies.sort()
    print(
        f"\nbuild end -> next queued build's first step, {len(latencies)} builds: "
        f"p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1]:.1f} ms, max {latencies[-1]:.1f} ms"
    )
