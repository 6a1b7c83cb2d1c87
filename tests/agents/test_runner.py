"""The step runner on real processes: output, variables, environment, timeouts, groups."""

import os
import signal
import time

import pytest

from agents.process.runner import MAX_LINE, MAX_WARNINGS, StepOutput, run_step, step_environment
from builds.definition import MAX_VARIABLE_NAME, MAX_VARIABLES
from tests.support import process_alive, wait_until


def run_with_output(command, tmp_path, timeout=30, env=None, max_bytes=1 << 20, grace=2.0):
    output = StepOutput(max_bytes)
    outcome = run_step(
        command,
        cwd=str(tmp_path),
        env=step_environment(env or {}, {"CI": "true"}),
        timeout=timeout,
        output=output,
        grace=grace,
    )
    return outcome, output


def run(command, tmp_path, **kwargs):
    outcome, output = run_with_output(command, tmp_path, **kwargs)
    return outcome, output.take() + output.truncation_notice()


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
        # The inner shell records its child in its own time; without this the count races.
        f'until [ "$(wc -l < {pids})" -ge 3 ]; do sleep 0.01; done\n'
        "wait"
    )
    started = time.monotonic()
    outcome, _ = run(command, tmp_path, timeout=1)
    assert outcome.timed_out
    assert time.monotonic() - started < 5
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 3  # child, child shell, grandchild
    wait_until(
        lambda: not any(process_alive(p) for p in recorded), timeout=5, message="group to die"
    )


def test_sigterm_ignored_is_followed_by_sigkill(tmp_path):
    pid_file = tmp_path / "pid"
    outcome, _ = run(f"trap '' TERM; echo $$ > {pid_file}; sleep 600", tmp_path, timeout=1, grace=1)
    assert outcome.timed_out
    assert not process_alive(int(pid_file.read_text()))


def test_background_processes_do_not_outlive_their_step(tmp_path):
    pid_file = tmp_path / "pid"
    outcome, _ = run(f"sleep 600 & echo $! > {pid_file}", tmp_path)
    assert outcome.exit_code == 0
    pid = int(pid_file.read_text())
    wait_until(lambda: not process_alive(pid), timeout=5, message="background sleep to die")


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


def test_on_tick_raising_still_ends_the_process_group(tmp_path):
    pids = tmp_path / "pids"

    def on_tick():  # writing the log fails: PostgreSQL is restarting
        if pids.exists() and pids.read_text().count("\n") == 2:
            raise RuntimeError("database restarting")
        return False

    with pytest.raises(RuntimeError, match="database restarting"):
        run_step(
            f"sleep 600 & echo $! >> {pids}; echo $$ >> {pids}; wait",
            cwd=str(tmp_path),
            env=step_environment({}, {}),
            timeout=30,
            output=StepOutput(1 << 20),
            grace=2,
            on_tick=on_tick,
        )
    recorded = [int(p) for p in pids.read_text().split()]
    assert [p for p in recorded if process_alive(p)] == []


def test_a_huge_line_without_newline_is_capped_in_linear_time(tmp_path):
    started = time.monotonic()
    outcome, text = run("head -c 32000000 /dev/zero | tr '\\0' x", tmp_path, max_bytes=1000)
    assert outcome.exit_code == 0
    assert time.monotonic() - started < 3  # quadratic before: about 10 s
    assert text == (
        "x" * 1000 + "\n[ciproject] log truncated: the first 1000 bytes are kept,"
        " 31999000 more bytes were discarded\n"
    )


def test_carriage_return_progress_reaches_the_log_while_the_step_runs(tmp_path):
    printed = tmp_path / "printed"
    output = StepOutput(1 << 20)
    seen = []

    def on_tick():
        seen.append(output.take())
        # Stop once all is printed and some has shown; if none shows, the step times out.
        return printed.exists() and bool("".join(seen))

    outcome = run_step(
        f"for i in $(seq 1 20000); do printf '\\r%6d' $i; done; touch {printed}; sleep 600",
        cwd=str(tmp_path),
        env=step_environment({}, {}),
        timeout=10,
        output=output,
        grace=2,
        on_tick=on_tick,
    )
    assert outcome.stopped
    assert "".join(seen) + output.take() == "".join(f"\r{i:6d}" for i in range(1, 20001))


def test_the_tail_of_an_overlong_line_is_never_a_set_variable():
    output = StepOutput(1 << 20)
    output.feed(b"x" * (MAX_LINE + 1))
    output.feed(b"::set-variable name=TAIL::1\n::set-variable name=NEXT::2\n")
    output.close()
    assert output.variables == {"NEXT": "2"}
    assert output.take() == "x" * (MAX_LINE + 1) + (
        "::set-variable name=TAIL::1\n::set-variable name=NEXT::2\n"
    )


def test_step_variables_are_capped_in_count(tmp_path):
    outcome, output = run_with_output(
        f'for i in $(seq 1 {MAX_VARIABLES + 1}); do echo "::set-variable name=V$i::x"; done\n'
        "echo '::set-variable name=V1::again'",  # replacing one does not count
        tmp_path,
    )
    assert len(outcome.variables) == MAX_VARIABLES
    assert f"V{MAX_VARIABLES + 1}" not in outcome.variables
    assert outcome.variables["V1"] == "again"
    assert output.warnings == [
        f"set-variable ignored: V{MAX_VARIABLES + 1}: a step sets at most {MAX_VARIABLES} variables"
    ]


def test_step_variables_are_capped_in_total_size(tmp_path):
    # Eight of 30000 bytes fit in 256 KiB, a ninth does not; once one shrinks, it does.
    outcome, output = run_with_output(
        "v=$(head -c 30000 /dev/zero | tr '\\0' a)\n"
        'for i in $(seq 1 9); do echo "::set-variable name=BIG$i::$v"; done\n'
        "echo '::set-variable name=BIG1::small'\n"
        'echo "::set-variable name=BIG10::$v"',
        tmp_path,
    )
    assert sorted(outcome.variables) == sorted(f"BIG{i}" for i in [*range(1, 9), 10])
    assert outcome.variables["BIG1"] == "small"
    assert output.warnings == [
        "set-variable ignored: BIG9: a step's variables total at most 262144 bytes"
    ]


def test_step_variable_names_are_capped_in_length(tmp_path):
    longest, too_long = "N" * MAX_VARIABLE_NAME, "N" * (MAX_VARIABLE_NAME + 1)
    outcome, output = run_with_output(
        f"echo '::set-variable name={longest}::1'; echo '::set-variable name={too_long}::1'",
        tmp_path,
    )
    assert outcome.variables == {longest: "1"}
    assert output.warnings == [
        f"set-variable ignored: {too_long[:40]}...: name longer than {MAX_VARIABLE_NAME}"
    ]


def test_ignored_set_variable_lines_do_not_flood_the_warnings(tmp_path):
    _, output = run_with_output(
        "for i in $(seq 1 100); do echo '::set-variable name=bad-name::x'; done", tmp_path
    )
    assert len(output.warnings) == MAX_WARNINGS + 1
    assert output.warnings[-1] == f"{100 - MAX_WARNINGS} more set-variable lines ignored"


def test_a_step_cannot_set_variables_that_change_how_the_shell_runs(tmp_path):
    outcome, output = run_with_output(
        "echo '::set-variable name=BASH_ENV::/tmp/evil'\n"
        "echo '::set-variable name=SHELLOPTS::xtrace'\n"
        "echo '::set-variable name=ci_build_id::1'\n"
        "echo '::set-variable name=FINE::1'",
        tmp_path,
    )
    assert outcome.variables == {"FINE": "1"}
    assert sum("is reserved" in w for w in output.warnings) == 3


def test_user_variables_cannot_override_the_agents_basics(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/agent")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"touch {marker}\n")
    _, text = run(
        'printf "%s\\n" "$HOME" "$PATH" "$GREETING" "$CI"; env | grep -c BASH_ENV || true',
        tmp_path,
        env={"HOME": "/evil", "PATH": "/evil", "BASH_ENV": str(evil), "GREETING": "hi"},
    )
    assert text.splitlines() == ["/home/agent", os.environ["PATH"], "hi", "true", "0"]
    assert not marker.exists()


def test_a_process_that_escaped_the_group_cannot_change_the_result(tmp_path):
    pid_file = tmp_path / "escaped"
    command = (
        f"setsid bash -c 'echo $$ > {pid_file}; n=0; while :; do n=$((n+1));"
        ' echo "::set-variable name=LATE::$n"; sleep 0.01; done\' &\n'
        f"until [ -s {pid_file} ]; do sleep 0.01; done\n"
        "echo '::set-variable name=EARLY::1'"
    )
    try:
        outcome, output = run_with_output(command, tmp_path, grace=0.5)
        returned = dict(outcome.variables)
        assert outcome.exit_code == 0
        assert returned["EARLY"] == "1"
        time.sleep(0.3)  # the escaped process goes on writing, if it still can
        assert outcome.variables == returned
        assert output.variables == returned
        # Our end of the pipe is closed, so the escaped writer dies of SIGPIPE.
        pid = int(pid_file.read_text())
        wait_until(lambda: not process_alive(pid), timeout=5, message="escaped process to end")
    finally:
        pid = int(pid_file.read_text())
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
