"""Scheduling overhead of a 200-job graph (`make bench`): a fan-out of 1 -> 198 -> 1 trivial
jobs through `needs`, and the same jobs in three stages, on four agent processes of the
test's own of capacity 4. Prints, for each, the time from the first job's end to the last
job's start (what the scheduler adds around 198 trivial jobs), the build's whole duration,
and the ratio of the two shapes; the graph should cost no more than the stages."""

import pytest

from builds import services
from builds.models import JobRun
from tests.support import make_pipeline, wait_for_build

FAN = 198
AGENTS, CAPACITY = 4, 4
LABEL = "benchdag"


def definition(with_needs: bool) -> str:
    needs = "needs: [first], " if with_needs else ""
    last_needs = "needs: [" + ", ".join(f"j{n}" for n in range(FAN)) + "], " if with_needs else ""
    middle = "".join(
        f"      - {{id: j{n}, {needs}runs-on: {LABEL}, steps: [{{run: 'true'}}]}}\n"
        for n in range(FAN)
    )
    first = f"      - {{id: first, runs-on: {LABEL}, steps: [{{run: 'true'}}]}}\n"
    last = f"      - {{id: last, {last_needs}runs-on: {LABEL}, steps: [{{run: 'true'}}]}}\n"
    return (
        f"stages:\n  - name: one\n    jobs:\n{first}  - name: fan\n    jobs:\n{middle}"
        f"  - name: end\n    jobs:\n{last}"
    )


def measure(name: str, with_needs: bool) -> tuple[float, float]:
    pipeline = make_pipeline(name, definition(with_needs))
    build = wait_for_build(services.trigger_build(pipeline), timeout=300)
    assert build.status == "SUCCEEDED"
    jobs = {job.key: job for job in JobRun.objects.filter(build=build)}
    fan = [jobs[f"j{n}"] for n in range(FAN)]  # the order held, whatever the shape
    assert min(job.started_at for job in fan) >= jobs["first"].finished_at
    assert jobs["last"].started_at >= max(job.finished_at for job in fan)
    overhead = (jobs["last"].started_at - jobs["first"].finished_at).total_seconds()
    return overhead, (build.finished_at - build.started_at).total_seconds()


@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)
def test_a_200_job_graph_against_the_same_jobs_in_stages(workers, dedicated):
    for n in range(1, AGENTS + 1):
        dedicated(f"agent-{LABEL}-{n}", f"linux,{LABEL}", capacity=CAPACITY)
    measure("warm-up", with_needs=True)
    graph, graph_total = measure("bench-graph", with_needs=True)
    stages, stages_total = measure("bench-stages", with_needs=False)
    print(
        f"\n200-job fan-out 1 -> {FAN} -> 1 on {AGENTS} agents x {CAPACITY}:"
        f" first job's end to last job's start {graph:.2f} s with needs,"
        f" {stages:.2f} s in stages (reference), ratio {graph / stages:.2f};"
        f" whole build {graph_total:.2f} s and {stages_total:.2f} s"
    )
