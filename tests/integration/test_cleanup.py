"""Cleanup on cancel, on real agents: a cancelled job's `if: cancelled()` and `if: always()`
steps run in its workspace while the build stays CANCELLING, within its cleanup-timeout, then
the jobs whose condition holds after a cancel, and the build ends CANCELED after them; a
second cancel stops them at once; the cancel watchdog waits for a cleanup that takes longer
than its usual wait."""

import pytest

from agents.models import Agent
from builds import services
from builds.errors import BuildAlreadyFinished
from builds.models import Build, JobRun, StepRun
from tests.support import make_pipeline, wait_for_build, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


NOTIFY = 'echo "notified: $CI_BUILD_NUMBER was cancelled"'


def cleaning(name: str, cleanup: str, cleanup_timeout: int = 300, notify: str = NOTIFY):
    return make_pipeline(
        name,
        f"""
stages:
  - name: work
    jobs:
      - id: job
        runs-on: linux
        cleanup-timeout: {cleanup_timeout}
        steps:
          - {{name: work, run: 'echo made > made-by-work; sleep 600'}}
          - {{name: after, run: 'echo never'}}
          - {{name: cleanup, if: 'cancelled()', run: '{cleanup}'}}
          - {{name: unwanted, if: "vars.X == 'y'", run: 'echo never'}}
          - {{name: always, if: 'always()', run: 'echo always ran'}}
  - name: later
    jobs:
      - {{id: later, runs-on: linux, steps: [{{run: 'echo never'}}]}}
      - {{id: on-failure, if: 'failure()', runs-on: linux, steps: [{{run: 'echo never'}}]}}
      - id: notify
        if: cancelled()
        runs-on: linux
        cleanup-timeout: {cleanup_timeout}
        steps:
          - {{name: notify, run: {notify!r}}}
""",
    )


def steps_of(build) -> dict[str, StepRun]:
    return {step.name: step for step in StepRun.objects.filter(job__build=build, job__key="job")}


def cancel_once_running(build, step: str = "work") -> None:
    wait_until(
        lambda: StepRun.objects.filter(job__build=build, name=step, status="RUNNING").exists(),
        timeout=30,
        message=f"step {step} to run",
    )
    assert services.request_cancel(build.pk) == "CANCELLING"


def test_a_cancelled_job_runs_its_cleanup_steps_then_the_build_ends_canceled():
    pipeline = cleaning("cleanup", 'echo "cleanup found $(cat made-by-work)"')
    build = services.trigger_build(pipeline)
    cancel_once_running(build)
    build = wait_for_build(build, timeout=30)
    steps = steps_of(build)
    assert build.status == "CANCELED"
    assert {name: step.status for name, step in steps.items()} == {
        "work": "CANCELED",
        "after": "CANCELED",
        "cleanup": "SUCCEEDED",
        "unwanted": "CANCELED",
        "always": "SUCCEEDED",
    }
    assert "cleanup found made" in services.step_log(steps["cleanup"], 1)  # its workspace
    assert "always ran" in services.step_log(steps["always"], 1)
    # The build was CANCELLING while they ran, and ended after them.
    assert build.cancel_requested_at < steps["cleanup"].started_at
    assert steps["always"].finished_at <= build.finished_at
    job = JobRun.objects.get(build=build, key="job")
    assert (job.status, job.reason) == (
        "CANCELED",
        "cancelled; then its cleanup steps ran (at most 300 s)",
    )
    jobs = {job.key: job for job in JobRun.objects.filter(build=build)}
    assert (jobs["later"].status, jobs["later"].reason) == ("CANCELED", "the build was cancelled")
    assert (jobs["on-failure"].status, jobs["on-failure"].reason) == (
        "CANCELED",
        "the build was cancelled, and if: failure() was false",
    )
    # The job whose condition holds after a cancel ran once the cancelled one had ended,
    # with its own result, and the build ended after it.
    assert (jobs["notify"].status, jobs["notify"].reason) == ("SUCCEEDED", "")
    assert jobs["job"].finished_at <= jobs["notify"].started_at
    assert jobs["notify"].finished_at <= build.finished_at
    [notify] = StepRun.objects.filter(job=jobs["notify"])
    assert "notified: 1 was cancelled" in services.step_log(notify, 1)


def test_a_hanging_cleanup_is_ended_by_its_cleanup_timeout():
    build = services.trigger_build(cleaning("hanging-cleanup", "sleep 600", cleanup_timeout=2))
    cancel_once_running(build)
    build = wait_for_build(build, timeout=30)
    steps = steps_of(build)
    assert build.status == "CANCELED"
    assert steps["cleanup"].status == "TIMED_OUT"
    assert "the job's cleanup-timeout of 2 s ran out" in services.step_log(steps["cleanup"], 1)
    assert steps["always"].status == "TIMED_OUT"  # no time was left for it: not started
    assert "not run: the job's cleanup-timeout" in services.step_log(steps["always"], 1)
    took = (steps["cleanup"].finished_at - steps["cleanup"].started_at).total_seconds()
    assert took < 10


def test_a_second_cancel_stops_the_cleanup_at_once():
    build = services.trigger_build(cleaning("forced", "sleep 600"))
    cancel_once_running(build)
    wait_until(
        lambda: StepRun.objects.filter(job__build=build, name="cleanup", status="RUNNING").exists(),
        timeout=30,
        message="the cleanup step to run",
    )
    assert services.request_cancel(build.pk) == "CANCELLING"  # forced: answered at once
    forced_at = Build.objects.get(pk=build.pk).cancel_forced_at
    build = wait_for_build(build, timeout=15)
    steps = steps_of(build)
    assert (build.status, steps["cleanup"].status, steps["always"].status) == (
        "CANCELED",
        "CANCELED",
        "CANCELED",
    )
    assert (build.finished_at - forced_at).total_seconds() < 5  # its grace period at most
    with pytest.raises(BuildAlreadyFinished):  # a third request: the build has ended
        services.request_cancel(build.pk)


def test_the_watchdog_waits_for_a_cleanup_longer_than_its_usual_wait():
    # The watchdog forces a cancel its agent did not confirm after 15 s here (heartbeat 1 +
    # offline 12 + margin 2); this cleanup takes 17 s, within its cleanup-timeout.
    build = services.trigger_build(cleaning("long-cleanup", "sleep 17", cleanup_timeout=60))
    cancel_once_running(build)
    build = wait_for_build(build, timeout=60)
    steps = steps_of(build)
    assert (build.status, steps["cleanup"].status) == ("CANCELED", "SUCCEEDED")
    assert not Agent.objects.exclude(suspect_since=None).exists()  # nobody was forced


def notify_of(build) -> JobRun:
    return JobRun.objects.get(build=build, key="notify")


def test_a_job_that_runs_after_the_cancel_is_ended_by_its_cleanup_timeout():
    build = services.trigger_build(cleaning("hanging-notify", "true", 2, notify="sleep 600"))
    cancel_once_running(build)
    build = wait_for_build(build, timeout=30)
    notify = notify_of(build)
    assert (build.status, notify.status) == ("CANCELED", "TIMED_OUT")
    [step] = StepRun.objects.filter(job=notify)
    assert "its cleanup-timeout of 2 s ran out" in services.step_log(step, 1)
    assert (notify.finished_at - notify.started_at).total_seconds() < 10


def test_a_second_cancel_stops_a_job_that_runs_after_the_first():
    build = services.trigger_build(cleaning("forced-notify", "true", notify="sleep 600"))
    cancel_once_running(build)
    wait_until(
        lambda: notify_of(build).status == "RUNNING", timeout=30, message="the notify job to run"
    )
    assert services.request_cancel(build.pk) == "CANCELLING"
    forced_at = Build.objects.get(pk=build.pk).cancel_forced_at
    build = wait_for_build(build, timeout=15)
    assert (build.status, notify_of(build).status) == ("CANCELED", "CANCELED")
    assert (build.finished_at - forced_at).total_seconds() < 5
