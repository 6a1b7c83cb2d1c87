"""Pipelines run end to end on real agents (`manage.py runagent` processes) and a real
controller, through Redis and PostgreSQL."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from builds import services
from builds.models import Build, JobRun, StepRun
from tests.support import make_pipeline, one_step, process_alive, wait_for_build, wait_until

pytestmark = pytest.mark.usefixtures("workers")


def steps_of(build, key):
    return list(StepRun.objects.filter(job__build=build, job__key=key).order_by("index"))


def log_of(step, attempt=None):
    return services.step_log(step, attempt)


@pytest.mark.django_db(transaction=True)
def test_multi_stage_pipeline_with_parallel_jobs():
    pipeline = make_pipeline(
        "parallel",
        """
stages:
  - name: build
    jobs:
      - {id: left, runs-on: linux, steps: [{name: work, run: "sleep 1; echo left done"}]}
      - {id: right, runs-on: linux, steps: [{name: work, run: "sleep 1; echo right done"}]}
  - name: test
    jobs:
      - {id: after, steps: [{run: echo after}]}
""",
    )
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "SUCCEEDED"
    assert build.finished_at >= build.started_at
    jobs = {job.key: job for job in JobRun.objects.filter(build=build)}
    left, right, after = jobs["left"], jobs["right"], jobs["after"]
    assert {left.agent, right.agent} == {"agent-1", "agent-2"}  # ran side by side
    assert left.started_at < right.finished_at
    assert right.started_at < left.finished_at
    assert after.started_at >= max(left.finished_at, right.finished_at)
    assert "left done" in log_of(steps_of(build, "left")[0])
    assert all(j.status == "SUCCEEDED" for j in jobs.values())


@pytest.mark.django_db(transaction=True)
def test_failing_step_fails_the_build_and_skips_the_rest():
    pipeline = make_pipeline(
        "failing",
        """
stages:
  - name: build
    jobs:
      - id: compile
        steps:
          - {name: ok, run: echo fine}
          - {name: broken, run: "echo about to fail; exit 3"}
          - {name: never, run: echo never}
  - name: deploy
    jobs:
      - {id: ship, steps: [{run: echo shipped}]}
""",
    )
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "FAILED"
    ok, broken, never = steps_of(build, "compile")
    assert (ok.status, broken.status, broken.exit_code, never.status) == (
        "SUCCEEDED",
        "FAILED",
        3,
        "SKIPPED",
    )
    assert "about to fail" in log_of(broken)
    compile_job, ship = JobRun.objects.filter(build=build).order_by("stage_index")
    assert compile_job.status == "FAILED"
    assert "broken" in compile_job.reason
    assert ship.status == "SKIPPED"
    assert steps_of(build, "ship")[0].status == "SKIPPED"


@pytest.mark.django_db(transaction=True)
def test_automatic_step_retry_and_continue_on_error():
    pipeline = make_pipeline(
        "flaky",
        """
stages:
  - name: test
    jobs:
      - id: flaky
        steps:
          - name: flaky
            run: 'echo "attempt $CI_STEP_ATTEMPT"; test "$CI_STEP_ATTEMPT" -ge 3'
            retry: 3
          - {name: optional, run: exit 4, continue-on-error: true}
          - {name: last, run: echo last}
""",
    )
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "SUCCEEDED"
    flaky, optional, last = steps_of(build, "flaky")
    assert (flaky.status, flaky.attempt, flaky.exit_code) == ("SUCCEEDED", 3, 0)
    assert "attempt 1" in log_of(flaky, 1)
    assert "retrying automatically" in log_of(flaky, 1)
    assert "attempt 3" in log_of(flaky, 3)
    assert (optional.status, optional.exit_code, last.status) == ("FAILED", 4, "SUCCEEDED")


@pytest.mark.django_db(transaction=True)
def test_retries_run_out():
    pipeline = make_pipeline(
        "always-fails",
        "stages:\n  - name: s\n    jobs:\n      - {id: j, steps: [{run: exit 1, retry: 2}]}\n",
    )
    build = wait_for_build(services.trigger_build(pipeline))
    (step,) = steps_of(build, "j")
    assert (build.status, step.status, step.attempt) == ("FAILED", "FAILED", 3)


@pytest.mark.django_db(transaction=True)
def test_step_timeout_kills_its_process_group(tmp_path):
    pids = tmp_path / "pids"
    pipeline = make_pipeline(
        "slow",
        f"""
stages:
  - name: s
    jobs:
      - id: j
        steps:
          - name: hangs
            timeout: 2
            run: |
              sleep 600 & echo $! >> {pids}
              bash -c 'sleep 600 & echo $! >> {pids}; wait' &
              echo $! >> {pids}
              until [ "$(wc -l < {pids})" -ge 3 ]; do sleep 0.05; done
              wait
""",
    )
    build = wait_for_build(services.trigger_build(pipeline))
    (step,) = steps_of(build, "j")
    assert (build.status, step.status) == ("FAILED", "TIMED_OUT")
    assert "timed out after 2 s" in log_of(step)
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 3
    wait_until(
        lambda: not any(process_alive(p) for p in recorded), timeout=5, message="group to die"
    )


@pytest.mark.django_db(transaction=True)
def test_set_variable_flows_to_later_steps_and_jobs():
    pipeline = make_pipeline(
        "variables",
        """
variables:
  GREETING: hello
  WHO: nobody
stages:
  - name: build
    jobs:
      - id: make
        runs-on: big
        steps:
          - run: 'echo "::set-variable name=VERSION::1.$CI_BUILD_NUMBER"'
          - run: 'echo "same job sees $VERSION"'
  - name: test
    jobs:
      - id: check
        steps:
          - run: 'echo "$GREETING $WHO, later job sees $VERSION"'
""",
    )
    build = wait_for_build(services.trigger_build(pipeline, {"WHO": "world; rm -rf /"}))
    assert build.status == "SUCCEEDED"
    assert JobRun.objects.get(build=build, key="make").agent == "agent-2"  # the only "big"
    assert "same job sees 1.1" in log_of(steps_of(build, "make")[1])
    assert "hello world; rm -rf /, later job sees 1.1" in log_of(steps_of(build, "check")[0])
    assert services.build_variables(build.pk)["VERSION"] == "1.1"


LEFT_FIELDS = ("build__number", "build__status", "status", "agent", "reason", "queued_at")


@pytest.mark.django_db(transaction=True)
def test_concurrent_triggers_get_distinct_numbers():
    pipeline = make_pipeline("busy", one_step("true"))

    def trigger(_):
        try:
            return services.trigger_build(pipeline).number
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=10) as pool:
        numbers = list(pool.map(trigger, range(50)))
    assert sorted(numbers) == list(range(1, 51))
    builds = Build.objects.filter(pipeline=pipeline)
    assert builds.count() == 50
    unfinished = builds.exclude(status="SUCCEEDED")

    def left() -> str:  # the state a timeout leaves, to tell a lost job from a slow machine
        jobs = JobRun.objects.filter(build__in=unfinished)
        return f"50 builds to succeed; left: {list(jobs.values_list(*LEFT_FIELDS))}"

    wait_until(lambda: not unfinished.exists(), timeout=90, message=left)


@pytest.mark.django_db(transaction=True)
def test_cli_loads_triggers_and_waits(worker_env, tmp_path):
    def manage(*argv):
        return subprocess.run(
            [sys.executable, "manage.py", *argv], env=worker_env, capture_output=True, text=True
        )

    for name, command in [("cli-ok", "true"), ("cli-bad", "false")]:
        definition = tmp_path / f"{name}.yaml"
        definition.write_text(one_step(command, variables="A"))
        loaded = manage("loadpipeline", name, str(definition))
        assert loaded.returncode == 0, loaded.stderr
        assert f"pipeline {name!r} created" in loaded.stdout
    ok = manage("trigger", "cli-ok", "--var", "A=1", "--wait", "--timeout", "60")
    build = Build.objects.get(pipeline__name="cli-ok")
    assert ok.returncode == 0
    assert ok.stdout.splitlines() == [f"build #1 (id {build.pk}) RUNNING", "SUCCEEDED"]
    bad = manage("trigger", "cli-bad", "--wait", "--timeout", "60")
    assert bad.returncode == 1
    assert "build #1 ended FAILED" in bad.stderr
    refused = manage("trigger", "cli-ok", "--var", "not a name=1")
    assert refused.returncode == 1
    assert "INVALID_VARIABLES" in refused.stderr
    assert Build.objects.filter(pipeline__name="cli-ok").count() == 1
