"""Retry rules on steps (`retry: {max, on, on-exit-codes, backoff}`), on real agents: what is
retried, and the waits between attempts (read from each attempt's own log)."""

import pytest

from builds import services
from builds.models import StepRun
from tests.support import make_pipeline, wait_for_build

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


def one_step_with(run: str, retry: str, timeout: int = 60):
    step = f"{{name: s, run: '{run}', retry: {retry}, timeout: {timeout}}}"
    return (
        "stages:\n  - name: s\n    jobs:\n      - id: j\n        runs-on: linux\n"
        f"        steps:\n          - {step}\n"
    )


def attempts_of(step: StepRun) -> list[float]:
    """The time each attempt printed first."""
    return [
        float(services.step_log(step, attempt).split()[1]) for attempt in range(1, step.attempt + 1)
    ]


def test_an_exit_code_of_the_rule_is_retried_with_a_doubling_backoff():
    # Exit 75 (EX_TEMPFAIL) twice, then succeed: the counter lives in the job's workspace,
    # which the step's automatic retries share.
    run = (
        'echo "start $(date +%s.%N)"; n=$(cat count 2>/dev/null || echo 0);'
        ' echo $((n + 1)) > count; [ "$n" -ge 2 ] || exit 75'
    )
    pipeline = make_pipeline(
        "retry-codes", one_step_with(run, "{max: 3, on-exit-codes: [75], backoff: 1}")
    )
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "SUCCEEDED"
    step = StepRun.objects.get(job__build=build)
    assert step.attempt == 3
    first, second, third = attempts_of(step)
    gaps = (second - first, third - second)
    print(f"\nretry backoff 1 s, doubling: gaps {gaps[0]:.2f} s and {gaps[1]:.2f} s")
    assert 1 <= gaps[0] < 1.9
    assert 2 <= gaps[1] < 2.9
    assert "retrying automatically in 1 s (3 left)" in services.step_log(step, 1)
    assert "retrying automatically in 2 s (2 left)" in services.step_log(step, 2)


def test_an_exit_code_outside_the_rule_is_not_retried():
    pipeline = make_pipeline(
        "retry-other-code", one_step_with("exit 1", "{max: 3, on-exit-codes: [75]}")
    )
    build = wait_for_build(services.trigger_build(pipeline))
    step = StepRun.objects.get(job__build=build)
    assert (build.status, step.status, step.attempt, step.exit_code) == ("FAILED", "FAILED", 1, 1)


def test_a_rule_for_timeouts_retries_timeouts_only():
    timing_out = make_pipeline(
        "retry-timeouts", one_step_with("sleep 30", "{max: 1, on: [timeout]}", timeout=1)
    )
    failing = make_pipeline(
        "retry-not-failures", one_step_with("exit 2", "{max: 1, on: [timeout]}")
    )
    timed_out = wait_for_build(services.trigger_build(timing_out))
    failed = wait_for_build(services.trigger_build(failing))
    assert StepRun.objects.get(job__build=timed_out).attempt == 2
    assert StepRun.objects.get(job__build=failed).attempt == 1
