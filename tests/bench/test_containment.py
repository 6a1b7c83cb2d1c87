"""Containment figures (`make bench`): what each containment adds to a trivial step (target at
most 5 ms), and how long ending a step whose processes honour SIGTERM takes (one of them out
of the step's group), in each mode (target p50 100 ms, p99 250 ms). "process group only" is
the baseline and escapes the detached process: it is no containment the agent uses."""

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
    fallback = containment.detect("bench", tmp_path, root=str(tmp_path))  # no cgroup there
    limits = containment.Limits(processes=1000, memory=1024**3)
    modes = {
        "process group only": lambda name: None,
        "process group and step token": fallback.box,
        "cgroup": cgroups.box,
        "cgroup with both limits": lambda name: cgroups.box(name, limits),
    }
    try:
        medians = {}
        for mode, box_for in modes.items():
            runs = [timed_step(tmp_path, "true", box_for(f"s{i}")) for i in range(STEPS)]
            medians[mode] = sorted(runs)[STEPS // 2]
            added = medians[mode] - medians["process group only"]
            print(
                f"\ntrivial step, {mode}, {STEPS} runs: {percentiles(runs)};"
                f" adds {added:.1f} ms at the median (target <= 5 ms)"
            )
        del modes["process group only"]  # the detached process would escape it (and hold the pipe)
        for mode, box_for in modes.items():
            ends = []
            for i in range(STOPS):
                asked = []

                def stop_now(asked=asked):
                    asked.append(time.perf_counter())
                    return True

                # The step's processes (one out of its group) exit on SIGTERM; the stop is
                # asked at the first tick.
                command = "setsid sleep 600 & sleep 600"
                timed_step(tmp_path, command, box_for(f"t{i}"), stop_now)
                ends.append((time.perf_counter() - asked[0]) * 1000)
            print(
                f"stop to step ended (SIGTERM honoured), {mode}: {percentiles(ends)}"
                " (target p50 <= 100 ms, p99 <= 250 ms)"
            )
    finally:
        cgroups.reap()
        cgroups.close()
