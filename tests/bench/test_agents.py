"""Agents under load (`make bench`): 500 builds of three jobs on four agent processes of the
test's own, with agent reuse (stage 1: `make`, which a later job reuses, beside `lint`;
stage 2: `use`, with `reuse: make`). Prints builds per minute, placement latency (a job's
started_at minus its queued_at) p50 and p99 over all jobs, and the agent leases left once
every build is final, which must be none."""

import os
import statistics
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from django.db.models import Max

from agents.models import Agent, AgentLease, LeaseWait
from builds import services
from builds.models import Build, JobRun
from builds.statuses import BUILD_FINAL
from tests.support import make_pipeline, wait_until

BUILDS = int(os.environ.get("BENCH_AGENT_BUILDS", 500))  # fewer, to profile a shorter run
AGENTS = 4
LABEL = "bench4"  # only this test's agents have it: the session agents take none of its jobs
WAVE = BUILDS  # builds triggered at once; the next wave once the previous one is final
DEADLINE = 600  # s, for all the builds to end
STALL = 60  # s without a build ending: fail at once, saying where the builds stand

PIPELINE = f"""
stages:
  - name: build
    jobs:
      - {{id: make, runs-on: {LABEL}, steps: [{{run: 'true'}}]}}
      - {{id: lint, runs-on: {LABEL}, steps: [{{run: 'true'}}]}}
  - name: use
    jobs:
      - {{id: use, reuse: make, steps: [{{run: 'true'}}]}}
"""


def percentile(sorted_values, fraction):
    return sorted_values[max(0, int(len(sorted_values) * fraction) - 1)]


def placement_ms(jobs) -> list[float]:
    """Each job's started_at minus its queued_at, in ms, sorted."""
    return sorted(
        (start - queued).total_seconds() * 1000
        for queued, start in jobs.values_list("queued_at", "started_at")
    )


def p50_p99(values) -> str:
    return f"p50 {statistics.median(values):.1f} ms, p99 {percentile(values, 0.99):.1f} ms"


def where_builds_stand(pipeline, log_dir) -> str:
    jobs = JobRun.objects.filter(build__pipeline=pipeline)
    by_status = Counter(jobs.values_list("key", "status"))
    reasons = Counter(jobs.exclude(reason="").values_list("status", "reason"))
    agents = {
        a.name: (a.status, list(AgentLease.objects.filter(agent=a).values_list("build", flat=True)))
        for a in Agent.objects.filter(labels__contains=[LABEL])
    }
    return (
        f"jobs by (key, status): {dict(by_status)}\n"
        f"reasons: {dict(reasons.most_common(5))}\n"
        f"agents (status, leased to builds): {agents}\n"
        f"lease waits: {LeaseWait.objects.count()}; worker logs in {log_dir}"
    )


@pytest.mark.timeout(DEADLINE + 300)
@pytest.mark.django_db(transaction=True)
def test_agents_throughput_placement_and_leases(workers, dedicated):
    for n in range(1, AGENTS + 1):
        dedicated(f"agent-{LABEL}-{n}", f"linux,{LABEL}", capacity=1)
    pipeline = make_pipeline("bench-agents", PIPELINE)
    builds = Build.objects.filter(pipeline=pipeline)
    unfinished = builds.exclude(status__in=BUILD_FINAL)
    controller_log = workers.log_dir / "controller.log"
    log_offset = controller_log.stat().st_size  # the session's earlier tests wrote before

    started = datetime.now(UTC)
    triggered = 0
    progress = {"final": 0, "at": time.monotonic()}

    def all_final():
        nonlocal triggered
        left = unfinished.count()
        if triggered < BUILDS and left == 0:
            for _ in range(min(WAVE, BUILDS - triggered)):
                services.trigger_build(pipeline)
            triggered += min(WAVE, BUILDS - triggered)
            return False
        final = triggered - left
        if final != progress["final"]:
            progress.update(final=final, at=time.monotonic())
        elif time.monotonic() - progress["at"] > STALL:
            pytest.fail(
                f"stalled: {final} of {BUILDS} builds final, none more in {STALL} s\n"
                + where_builds_stand(pipeline, workers.log_dir)
            )
        return triggered == BUILDS and left == 0

    wait_until(all_final, timeout=DEADLINE, interval=0.5)
    ended = builds.aggregate(last=Max("finished_at"))["last"]
    minutes = (ended - started).total_seconds() / 60
    leaked = AgentLease.objects.count()  # every build is final: no agent may stay leased

    statuses = Counter(builds.values_list("status", flat=True))
    jobs = JobRun.objects.filter(build__pipeline=pipeline)
    latencies = placement_ms(jobs)
    stage_1 = placement_ms(jobs.filter(stage_index=0))
    stage_2 = placement_ms(jobs.filter(stage_index=1))
    with controller_log.open("rb") as log:
        log.seek(log_offset)
        swept = log.read().count(b"lease sweep:")  # leases the normal path failed to release
    print(
        f"\nagents: {BUILDS} builds of 3 jobs on {AGENTS} agents (capacity 1), waves of {WAVE}:"
        f" {BUILDS / minutes:.0f} builds/min ({minutes * 60:.1f} s)"
        f"\n  placement latency over {len(latencies)} jobs: {p50_p99(latencies)},"
        f" max {latencies[-1]:.1f} ms"
        f"\n    stage 1 (label queues, behind the backlog): {p50_p99(stage_1)}"
        f"\n    stage 2 (reuse: the leased agent's own queue): {p50_p99(stage_2)}"
        f"\n  leaked agent leases at the end: {leaked}"
        f" (released by the lease sweep meanwhile: {swept})"
    )
    assert statuses == {"SUCCEEDED": BUILDS}, dict(statuses)
    assert leaked == 0
