"""Steps contained, on this machine's cgroups and in the fallback (real processes, checked by
pid and by the cgroup's contents): whatever a step starts ends with it, however it left the
step's process group; a step's limits hold. The cgroup mode uses the machine's cgroup2
mount (and the cgroup v1 pids and memory hierarchies beside it for limits); the fallback
(process group and step token) is what detect gives where no cgroup can be had."""

import subprocess
import sys
import time

import pytest

from agents.process import containment, orphans, proctable
from agents.process.containment import Limits, LimitUnavailable
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
    found.close()
    assert not found.subtree.exists()


@pytest.fixture
def fallback(tmp_path):
    found = containment.detect("unit", tmp_path, root=str(tmp_path))  # not a cgroup
    assert isinstance(found, containment.ProcessGroups)
    return found


@pytest.fixture(params=["cgroup", "fallback"])
def contained(request):
    return request.getfixturevalue({"cgroup": "cgroups", "fallback": "fallback"}[request.param])


def run_boxed(mode, command, tmp_path, name="step", limits=containment.NO_LIMITS, **kwargs):
    pids = tmp_path / "pids"
    pids.touch()
    options = {"timeout": 30, "grace": 1.0, **kwargs}
    box = mode.box(name, limits)
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
def test_processes_that_left_the_group_end_with_their_step(contained, tmp_path, ending):
    command = ESCAPES + ("" if ending == "its end" else "sleep 600\n")
    started = time.monotonic()
    kwargs = {
        "its end": {},
        "its timeout": {"timeout": 2},
        "a stop": {"on_tick": lambda: time.monotonic() - started > 1},
    }[ending]
    outcome, pids, box = run_boxed(contained, command, tmp_path, **kwargs)
    assert len(pids) == 4
    alive = [pid for pid in pids if process_alive(pid)]
    assert alive == []  # at once: the step ends only once all of it has
    if isinstance(box, containment.CgroupBox):
        assert not box.path.exists()
    assert outcome.timed_out == (ending == "its timeout")
    assert outcome.stopped == (ending == "a stop")


def test_a_step_that_ignores_sigterm_and_keeps_forking_is_killed_after_the_grace(
    contained, tmp_path
):
    command = "trap '' TERM; while :; do setsid sleep 600 & echo $! >> \"$PIDS\"; sleep 0.02; done"
    started = time.monotonic()
    outcome, pids, _box = run_boxed(contained, command, tmp_path, timeout=1, grace=0.5)
    assert outcome.timed_out
    assert time.monotonic() - started >= 1.5  # the grace was given
    assert pids
    assert not any(process_alive(pid) for pid in pids)


def test_a_restarted_agent_ends_what_its_previous_life_left_in_its_cgroups(cgroups, tmp_path):
    """The agent was killed with a step running: the step's cgroup is still there, with a
    detached process in it. reap() (run by detect at the agent's start) kills and removes it."""
    pids = tmp_path / "pids"
    box = cgroups.box("left-behind")
    step = box.spawn(
        ["sh", "-c", f"setsid sleep 600 & echo $! > {pids}; sleep 600"], start_new_session=True
    )
    wait_until(lambda: pids.exists() and pids.read_text().strip(), timeout=10)
    orphan = int(pids.read_text())
    assert orphan in box.pids()
    assert cgroups.reap() == [box.path]
    assert not process_alive(orphan)
    step.wait(timeout=5)
    assert not box.path.exists()


def test_without_cgroups_a_restarted_agent_ends_the_group_and_the_token_carriers(
    fallback, tmp_path
):
    """The fallback's record of a running step is its first process and its token: a
    restarted agent kills the step's group and whatever still carries the token, wherever it
    was reparented."""
    pids, markers = tmp_path / "pids", tmp_path / "steps"
    box = fallback.box("left-behind")
    step = box.spawn(
        ["sh", "-c", f"setsid sleep 600 & echo $! > {pids}; sleep 600"],
        env={"PATH": "/usr/bin:/bin"},
        start_new_session=True,
    )
    orphans.record(markers, step.pid, box.token)
    wait_until(lambda: pids.exists() and pids.read_text().strip(), timeout=10)
    detached = int(pids.read_text())
    wait_until(lambda: proctable.read(detached).pgid == detached, timeout=10)  # out of the group
    steps = {p.pid for p in proctable.descendants(step.pid, proctable.processes())} | {step.pid}
    killed = set(orphans.reap(markers))
    # The group's SIGKILL takes a moment to land: a member the token scan still saw may be
    # killed twice. Nothing but the step's processes, and the leader and the detached one.
    assert {step.pid, detached} <= killed <= steps
    step.wait(timeout=5)
    wait_until(lambda: not any(process_alive(pid) for pid in steps), timeout=5)
    assert not list(markers.iterdir())


def test_without_cgroups_the_agent_falls_back_and_says_why(fallback):
    assert isinstance(fallback.box("step"), containment.TokenBox)
    assert "no cgroup.kill" in fallback.describe()
    with pytest.raises(LimitUnavailable, match="max-memory: this agent cannot enforce it"):
        fallback.box("step", Limits(memory=64 * 1024**2))


def test_a_step_stopped_as_it_starts_is_ended_too(contained, tmp_path):
    """Stopped at the first tick, the step's first process may not have entered its cgroup
    yet: the end waits for it, rather than finding the cgroup empty and waiting on the step
    for ever. (Twenty times: the race is won or lost within a millisecond.)"""
    for attempt in range(20):
        started = time.monotonic()
        outcome, _, _box = run_boxed(
            contained, "sleep 600", tmp_path, name=f"s{attempt}", on_tick=lambda: True, tick=0.001
        )
        assert outcome.stopped
        assert time.monotonic() - started < 5


def test_the_machine_gives_both_limits(cgroups):
    """CI runs where the limits hold (here with the cgroup v1 pids and memory hierarchies)."""
    assert set(cgroups.controllers) == {"pids", "memory"}, cgroups.missing


def test_a_fork_bomb_stops_at_max_processes(cgroups, tmp_path):
    """The bomb's forks fail past the limit; whatever it left running ends with the step."""
    counts = []
    box_of = {}

    def watch():
        counts.append(len(box_of["box"].pids()))
        return False

    limits = Limits(processes=30)
    box_of["box"] = box = cgroups.box("bomb", limits)
    outcome = run_step(  # the bomb, then a loop that goes on whether its forks fail or not
        "bomb() { bomb | bomb & }; bomb; while :; do sleep 0.1 || :; done",
        cwd=str(tmp_path),
        env=step_environment({}, {}),
        output=(output := StepOutput(1 << 20)),
        timeout=3,
        grace=0.5,
        on_tick=watch,
        box=box,
    )
    assert outcome.timed_out
    assert counts
    assert max(counts) <= 30
    assert outcome.limit_hits["pids"] > 0  # forks were refused
    assert not box.path.exists()  # ended, every process of it
    assert "Resource temporarily unavailable" in output.take()


def test_a_step_over_max_memory_is_killed_by_the_oom_killer(cgroups, tmp_path):
    grow = f"{sys.executable} -c 'b = bytearray(400 * 1024 ** 2); print(\"survived\")'"
    outcome, _, box = run_boxed(cgroups, grow, tmp_path, limits=Limits(memory=64 * 1024**2))
    assert outcome.exit_code in (
        -9,
        137,
    )  # SIGKILL from the kernel (bash may exec the last command)
    assert outcome.limit_hits == {"memory": 1}
    assert not box.path.exists()


def test_a_step_under_its_limits_runs_as_usual(cgroups, tmp_path):
    limits = Limits(processes=100, memory=256 * 1024**2)
    outcome, _, _ = run_boxed(
        cgroups, "for i in 1 2 3; do sleep 0.01 & done; wait", tmp_path, limits=limits
    )
    assert (outcome.exit_code, outcome.limit_hits) == (0, {})


def test_a_killed_step_of_another_process_is_not_reaped_as_an_orphan(fallback, tmp_path):
    """The fallback's agent is a subreaper and reaps its orphans; never a step's first
    process, whose exit status its runner waits for."""
    box = fallback.box("exit-code")
    proc = box.spawn(["sh", "-c", "exit 3"], env={}, stdin=subprocess.DEVNULL)
    wait_until(lambda: not process_alive(proc.pid), timeout=10)  # a zombie, not yet waited
    fallback.reap_zombies()
    box.end(proc, 1)
    assert proc.returncode == 3
