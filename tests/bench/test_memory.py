"""Resident memory under load (`make bench`): an agent of capacity 4 running 2,000 trivial
jobs (500 builds of four parallel one-step jobs), and the controller advancing them. Their
resident set (VmRSS of the process and its children: the agent's steps are gone between
samples) is sampled after each 200 jobs; it must be flat: no growth after the first 200.
Prints each process's growth after the first 200 jobs, per 1,000 jobs, and whether it is
flat. Reference, same run: each process's resident set before the first job."""

import os
import time

import pytest

from builds import services
from builds.models import Build
from builds.statuses import BUILD_FINAL
from tests.support import make_pipeline, wait_until

LABEL = "benchmem"
BUILDS = 500
JOBS_PER_BUILD = 4
SAMPLE_EVERY = 200  # jobs
# Flat: within one pymalloc arena (256 KiB) over the whole run, the resident set's noise (a
# page touched by a freed-and-reused block counts until the allocator returns its arena).
FLAT_KIB = 256
PIPELINE = "stages:\n  - name: s\n    jobs:\n" + "".join(
    f"      - {{id: j{n}, runs-on: {LABEL}, steps: [{{run: 'true'}}]}}\n"
    for n in range(JOBS_PER_BUILD)
)


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` and of its live descendants (the agent's are gone between jobs)."""
    total, pids = 0, [pid]
    while pids:
        current = pids.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                pids += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue  # ended meanwhile
    return total


@pytest.mark.timeout(1800)
@pytest.mark.django_db(transaction=True)
def test_agent_and_controller_memory_stay_flat(workers, dedicated):
    name = f"agent-{LABEL}"
    dedicated(name, f"linux,{LABEL}", capacity=4)
    agent_pid, controller_pid = workers.procs[name].pid, workers.procs["controller"].pid
    pipeline = make_pipeline("bench-memory", PIPELINE)
    builds = Build.objects.filter(pipeline=pipeline)
    samples = [(0, rss_kib(agent_pid), rss_kib(controller_pid))]
    started = time.monotonic()
    per_sample = SAMPLE_EVERY // JOBS_PER_BUILD
    for done in range(per_sample, BUILDS + 1, per_sample):
        for _ in range(per_sample):
            services.trigger_build(pipeline)
        wait_until(
            lambda: not builds.exclude(status__in=BUILD_FINAL).exists(),
            timeout=600,
            interval=0.5,
            message=f"builds up to {done} to end",
        )
        samples.append((done * JOBS_PER_BUILD, rss_kib(agent_pid), rss_kib(controller_pid)))
    elapsed = time.monotonic() - started
    assert set(builds.values_list("status", flat=True)) == {"SUCCEEDED"}
    assert os.path.exists(f"/proc/{agent_pid}")  # the same agent process throughout

    first, last = samples[1], samples[-1]  # after the first 200 jobs, and at the end
    lines = "\n".join(
        f"  {jobs:>5} jobs: agent {agent / 1024:6.1f} MiB, controller {controller / 1024:6.1f} MiB"
        for jobs, agent, controller in samples
    )
    # The second half's own rate tells growth that goes on (a leak) from growth that levels
    # off (the allocator's arenas filling up to their working size).
    middle = samples[len(samples) // 2]
    verdicts = "\n".join(
        f"  {name}: {verdict(first[i], last[i], last[0] - first[0])};"
        f" from {middle[0]} jobs on: {(last[i] - middle[i]) * 1000 / (last[0] - middle[0]):+.0f}"
        " KiB per 1,000 jobs"
        for i, name in ((1, "agent"), (2, "controller"))
    )
    print(
        f"\nresident memory, {BUILDS * JOBS_PER_BUILD} trivial jobs on one agent of capacity 4"
        f" ({elapsed:.0f} s):\n{lines}"
        f"\n  growth after the first {SAMPLE_EVERY} jobs, per 1,000 jobs (target: none, within"
        f" {FLAT_KIB} KiB over the run):\n{verdicts}"
        f"\n  reference, before the first job: agent {samples[0][1] / 1024:.1f} MiB,"
        f" controller {samples[0][2] / 1024:.1f} MiB"
    )


def verdict(first_kib: int, last_kib: int, jobs: int) -> str:
    grown = last_kib - first_kib
    flat = "flat" if grown <= FLAT_KIB else "GROWS"
    return f"{grown * 1000 / jobs:+.0f} KiB per 1,000 jobs ({grown / 1024:+.2f} MiB in all): {flat}"
