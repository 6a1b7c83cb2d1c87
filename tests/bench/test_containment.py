"""Containment figures (`make bench`): what a cgroup of its own adds to a trivial step (target
at most 5 ms), and how long ending a step whose processes honour SIGTERM takes, in the cgroup
mode and the process-group mode (target p50 100 ms, p99 250 ms)."""

import time

from agents.process import containment
from agents.process.runner import StepOutput, run_step, step_environment
from tests.bench.test_cancel_latency import percentiles

STEPS = 200
STOPS = 50


def timed_step(tmp_path, command: str, box, on_tick=lambda: False) -> float:
    started = time.perf_counter()
    run_step(
        command,
        cwd=str(tmp_path),
        env=step_environment({}, {}),
        timeout=60,
        output=StepOutput(1 << 20),
        grace=5,
        on_tick=on_tick,
        tick=0.01,
        box=box,
    )
    return (time.perf_counter() - started) * 1000


def test_containment_costs(tmp_path):
    cgroups = containment.detect(f"bench-{time.time_ns()}", tmp_path)
    assert isinstance(cgroups, containment.Cgroups), cgroups.describe()
    try:
        plain = [timed_step(tmp_path, "true", None) for _ in range(STEPS)]
        boxed = [timed_step(tmp_path, "true", cgroups.box(f"s{i}")) for i in range(STEPS)]
        added = sorted(plain)[STEPS // 2], sorted(boxed)[STEPS // 2]
        print(
            f"\ntrivial step, {STEPS} runs: process group {percentiles(plain)};"
            f" cgroup {percentiles(boxed)}; the cgroup adds {added[1] - added[0]:.1f} ms at"
            " the median (target <= 5 ms)"
        )
        for mode, box_for in [("process group", lambda name: None), ("cgroup", cgroups.box)]:
            ends = []
            for i in range(STOPS):
                asked = []

                def stop_now(asked=asked):
                    asked.append(time.perf_counter())
                    return True

                # The step's processes exit on SIGTERM; the stop is asked at the first tick.
                timed_step(tmp_path, "sleep 600 & sleep 600", box_for(f"t{i}"), stop_now)
                ends.append((time.perf_counter() - asked[0]) * 1000)
            print(f"stop to step ended (SIGTERM honoured), {mode}: {percentiles(ends)}")
    finally:
        cgroups.reap()
        cgroups.subtree.rmdir()
