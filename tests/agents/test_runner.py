"""The step runner on real processes: output, variables, environment, timeouts, groups."""

import os
import time

from agents.runner import StepOutput, run_step, step_environment
from tests.support import wait_until


def run(command, tmp_path, timeout=30, env=None, max_bytes=1 << 20, grace=2.0):
    output = StepOutput(max_bytes)
    outcome = run_step(
        command,
        cwd=str(tmp_path),
        env=step_environment(env or {}, {"CI": "true"}),
        timeout=timeout,
        output=output,
        grace=grace,
    )
    return outcome, output.take() + output.truncation_notice()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) until its parent reaps it: read its state.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_output_and_exit_code(tmp_path):
    outcome, text = run("echo out; echo err >&2; pwd; exit 7", tmp_path)
    assert outcome.exit_code == 7
    assert not outcome.timed_out
    assert text.splitlines() == ["out", "err", str(tmp_path)]


def test_a_failing_line_fails_the_step(tmp_path):
    outcome, text = run("false\necho never", tmp_path)
    assert outcome.exit_code == 1
    assert "never" not in text


def test_set_variable_lines_are_collected(tmp_path):
    outcome, _ = run(
        "echo '::set-variable name=VERSION::1.2.3'; echo '::set-variable name=bad-name::x'",
        tmp_path,
    )
    assert outcome.variables == {"VERSION": "1.2.3"}


def test_variables_are_environment_not_code(tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}); `touch {marker}`; ' \" \\"
    outcome, text = run('printf "%s\\n" "$EVIL"', tmp_path, env={"EVIL": hostile})
    assert outcome.exit_code == 0
    assert text == hostile + "\n"
    assert not marker.exists()


def test_agent_secrets_do_not_reach_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://secret")
    _, text = run("env", tmp_path)
    assert "DATABASE_URL" not in text
    assert "CI=true" in text


def test_log_is_capped_with_a_marker(tmp_path):
    outcome, text = run(
        "head -c 50000 /dev/zero | tr '\\0' 'x'; echo; echo tail", tmp_path, max_bytes=1000
    )
    assert outcome.exit_code == 0
    assert text.startswith("x" * 1000)
    assert "log truncated: the first 1000 bytes are kept, 49006 more bytes were discarded" in text


def test_invalid_utf8_and_nul_are_kept_readable(tmp_path):
    _, text = run(r"printf 'a\377b\000c\n'", tmp_path)
    assert text == "a\ufffdb\ufffdc\n"


def test_timeout_kills_the_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    command = (
        f"sleep 600 & echo $! >> {pids}\n"
        f"bash -c 'sleep 600 & echo $! >> {pids}; wait' &\n"
        f"echo $! >> {pids}\n"
        "wait"
    )
    started = time.monotonic()
    outcome, _ = run(command, tmp_path, timeout=1)
    assert outcome.timed_out
    assert time.monotonic() - started < 5
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 3  # child, child shell, grandchild
    wait_until(lambda: not any(alive(p) for p in recorded), timeout=5, message="group to die")


def test_sigterm_ignored_is_followed_by_sigkill(tmp_path):
    pid_file = tmp_path / "pid"
    outcome, _ = run(f"trap '' TERM; echo $$ > {pid_file}; sleep 600", tmp_path, timeout=1, grace=1)
    assert outcome.timed_out
    assert not alive(int(pid_file.read_text()))


def test_background_processes_do_not_outlive_their_step(tmp_path):
    pid_file = tmp_path / "pid"
    outcome, _ = run(f"sleep 600 & echo $! > {pid_file}", tmp_path)
    assert outcome.exit_code == 0
    pid = int(pid_file.read_text())
    wait_until(lambda: not alive(pid), timeout=5, message="background sleep to die")


def test_on_tick_can_stop_a_step(tmp_path):
    started = time.monotonic()
    output = StepOutput(1 << 20)
    outcome = run_step(
        "sleep 600",
        cwd=str(tmp_path),
        env=step_environment({}, {}),
        timeout=60,
        output=output,
        grace=2,
        on_tick=lambda: time.monotonic() - started > 0.3,
    )
    assert outcome.stopped
    assert time.monotonic() - started < 3
