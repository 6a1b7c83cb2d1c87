"""Steps in cgroups of their own, on this machine's cgroup v2 (real processes, checked by pid
and by the cgroup's contents): whatever a step starts ends with it, however it left the
step's process group."""

import subprocess
import time

import pytest

from agents.process import containment
from agents.process.runner import StepOutput, run_step, step_environment
from tests.support import process_alive, wait_until

# Ways CI scripts leave a step's process group: a new session, nohup in the background, a
# daemon that double-forks into a new session, a subshell's background child.
ESCAPES = """
setsid sleep 600 & echo $! >> "$PIDS"
nohup sleep 600 > /dev/null 2>&1 & echo $! >> "$PIDS"
sh -c 'setsid sh -c "sleep 600 & echo \\$! >> \\"$PIDS\\"" &'
( sleep 600 & echo $! >> "$PIDS" ) &
until [ "$(wc -l < "$PIDS")" -ge 4 ]; do sleep 0.01; done
"""


@pytest.fixture
def cgroups(tmp_path):
    found = containment.detect(f"unit-{tmp_path.name}", tmp_path)
    assert isinstance(found, containment.Cgroups), found.describe()  # CI runs the cgroup mode
    yield found
    found.reap()
    found.subtree.rmdir()


def run_boxed(cgroups, command, tmp_path, name="step", **kwargs):
    pids = tmp_path / "pids"
    pids.touch()
    options = {"timeout": 30, "grace": 1.0, **kwargs}
    box = cgroups.box(name)
    outcome = run_step(
        command,
        cwd=str(tmp_path),
        env=step_environment({"PIDS": str(pids)}, {}),
        output=StepOutput(1 << 20),
        box=box,
        **options,
    )
    return outcome, [int(pid) for pid in pids.read_text().split()], box


@pytest.mark.parametrize("ending", ["its end", "its timeout", "a stop"])
def test_processes_that_left_the_group_end_with_their_step(cgroups, tmp_path, ending):
    command = ESCAPES + ("" if ending == "its end" else "sleep 600\n")
    started = time.monotonic()
    kwargs = {
        "its end": {},
        "its timeout": {"timeout": 2},
        "a stop": {"on_tick": lambda: time.monotonic() - started > 1},
    }[ending]
    outcome, pids, box = run_boxed(cgroups, command, tmp_path, **kwargs)
    assert len(pids) == 4
    alive = [pid for pid in pids if process_alive(pid)]
    assert alive == []  # at once: the step ends only once its cgroup is empty
    assert not box.path.exists()
    assert outcome.timed_out == (ending == "its timeout")
    assert outcome.stopped == (ending == "a stop")


def test_a_step_that_ignores_sigterm_and_keeps_forking_is_killed_after_the_grace(cgroups, tmp_path):
    command = "trap '' TERM; while :; do sleep 600 & echo $! >> \"$PIDS\"; sleep 0.02; done"
    started = time.monotonic()
    outcome, pids, box = run_boxed(cgroups, command, tmp_path, timeout=1, grace=0.5)
    assert outcome.timed_out
    assert time.monotonic() - started >= 1.5  # the grace was given
    assert pids
    assert not any(process_alive(pid) for pid in pids)
    assert not box.path.exists()


def test_a_restarted_agent_ends_what_its_previous_life_left_in_its_cgroups(cgroups, tmp_path):
    """The agent was killed with a step running: the step's cgroup is still there, with a
    detached process in it. reap() (run by detect at the agent's start) kills and removes it."""
    pids = tmp_path / "pids"
    box = cgroups.box("left-behind")
    step = subprocess.Popen(
        box.argv(["sh", "-c", f"setsid sleep 600 & echo $! > {pids}; sleep 600"]),
        start_new_session=True,
    )
    wait_until(lambda: pids.exists() and pids.read_text().strip(), timeout=10)
    orphan = int(pids.read_text())
    assert orphan in box.pids()
    assert cgroups.reap() == [box.path]
    assert not process_alive(orphan)
    step.wait(timeout=5)
    assert not box.path.exists()


def test_without_cgroups_the_agent_falls_back_to_process_groups_and_says_why(tmp_path):
    found = containment.detect("unit", tmp_path, root=str(tmp_path))  # not a cgroup
    assert isinstance(found, containment.ProcessGroups)
    assert found.box("step") is None
    assert "no cgroup.kill" in found.describe()


def test_a_step_stopped_as_it_starts_is_ended_too(cgroups, tmp_path):
    """Stopped at the first tick, the step's first process may not have entered its cgroup
    yet: the end waits for it, rather than finding the cgroup empty and waiting on the step
    for ever. (Twenty times: the race is won or lost within a millisecond.)"""
    for attempt in range(20):
        started = time.monotonic()
        outcome, _, box = run_boxed(
            cgroups, "sleep 600", tmp_path, name=f"s{attempt}", on_tick=lambda: True, tick=0.001
        )
        assert outcome.stopped
        assert time.monotonic() - started < 5
        assert not box.path.exists()
