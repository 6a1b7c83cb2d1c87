"""needs, matrix and if: on real agents: a job that needs another starts without waiting for
the rest of its stage, a matrix runs each combination with its values and never more than
max-parallel at once, fail-fast stops the other runs, and conditions run or skip jobs and
steps, saying why."""

import pytest

from builds import services
from builds.models import JobRun, StepRun
from tests.support import make_pipeline, wait_for_build

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


def jobs_of(build) -> dict[str, JobRun]:
    return {job.key: job for job in JobRun.objects.filter(build=build)}


FAN = """
stages:
  - name: first
    jobs:
      - {{id: slow, runs-on: linux, steps: [{{run: 'sleep 3'}}]}}
      - {{id: fast, runs-on: linux, steps: [{{run: 'true'}}]}}
  - name: second
    jobs:
      - {{id: after, runs-on: linux, {needs} steps: [{{run: 'true'}}]}}
"""


def test_a_job_that_needs_one_job_starts_before_the_rest_of_the_stage_ends():
    dag = wait_for_build(
        services.trigger_build(make_pipeline("dag", FAN.format(needs="needs: [fast],")))
    )
    staged = wait_for_build(services.trigger_build(make_pipeline("staged", FAN.format(needs=""))))
    assert (dag.status, staged.status) == ("SUCCEEDED", "SUCCEEDED")
    with_needs, without = jobs_of(dag), jobs_of(staged)
    assert with_needs["after"].started_at < with_needs["slow"].finished_at
    assert without["after"].started_at >= without["slow"].finished_at
    print(
        f"\nneeds: the build took {(dag.finished_at - dag.started_at).total_seconds():.2f} s,"
        f" in stages {(staged.finished_at - staged.started_at).total_seconds():.2f} s"
    )


MATRIX = """
stages:
  - name: test
    jobs:
      - id: test
        runs-on: ${matrix.where}
        matrix:
          python: ["3.11", "3.12"]
          db: [pg15, pg16, pg17]
          where: [matrix]
          exclude: [{python: "3.11", db: pg17}]
          max-parallel: 2
        steps:
          - run: 'echo "python=$MATRIX_PYTHON db=$MATRIX_DB"; sleep 0.5'
"""


def most_at_once(jobs) -> int:
    events = sorted(
        [(job.started_at, 1) for job in jobs] + [(job.finished_at, -1) for job in jobs],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same time
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_a_matrix_runs_each_combination_never_more_than_max_parallel(dedicated):
    dedicated("agent-matrix", "matrix", capacity=4)
    build = wait_for_build(services.trigger_build(make_pipeline("matrix", MATRIX)), timeout=90)
    assert build.status == "SUCCEEDED"
    jobs = list(JobRun.objects.filter(build=build))
    combinations = ["3.11 pg15", "3.11 pg16", "3.12 pg15", "3.12 pg16", "3.12 pg17"]
    assert sorted(job.key for job in jobs) == [
        "test (python={}, db={}, where=matrix)".format(*pair.split()) for pair in combinations
    ]
    assert {job.agent for job in jobs} == {"agent-matrix"}  # runs-on: ${matrix.where}
    assert most_at_once(jobs) == 2  # in parallel, never more than max-parallel
    for job in jobs:
        step = job.steps.get()
        values = job.matrix
        expected = f"python={values['python']} db={values['db']}"
        assert expected in services.step_log(step, step.attempt)


FAIL_FAST = """
stages:
  - name: test
    jobs:
      - id: t
        runs-on: fast
        matrix: {a: [1, 2, 3]}
        steps:
          - run: 'if [ "$MATRIX_A" = 1 ]; then sleep 0.5; exit 1; fi; sleep 60'
  - name: after
    jobs:
      - {id: next, runs-on: fast, steps: [{run: 'true'}]}
"""


def test_fail_fast_stops_the_other_runs_of_the_matrix(dedicated):
    dedicated("agent-fast", "fast", capacity=3)
    build = wait_for_build(services.trigger_build(make_pipeline("fail-fast", FAIL_FAST)), 30)
    jobs = jobs_of(build)
    assert build.status == "FAILED"
    assert jobs["t (a=1)"].status == "FAILED"
    for key in ("t (a=2)", "t (a=3)"):
        assert (jobs[key].status, jobs[key].reason) == (
            "CANCELED",
            "fail-fast: 't (a=1)' ended FAILED",
        )
        assert jobs[key].steps.get().status == "CANCELED"
    assert (jobs["next"].status, jobs["next"].reason) == (
        "SKIPPED",
        "waited for the earlier stages, where 't (a=1)' ended FAILED",
    )


CONDITIONS = """
variables: {MODE: slow}
stages:
  - name: first
    jobs:
      - id: breaks
        runs-on: linux
        steps:
          - {name: fails, run: 'exit 3'}
          - {name: default, run: 'echo never'}
          - {name: on-failure, if: 'failure()', run: 'echo cleaning up after a failure'}
          - {name: always, if: 'always()', run: 'echo always'}
          - {name: guarded, if: "vars.MODE == 'slow'", run: 'echo not after a failure'}
      - id: fine
        runs-on: linux
        steps:
          - {name: fast-only, if: "vars.MODE == 'fast'", run: 'echo fast'}
          - {name: slow-only, if: "vars.MODE != 'fast'", run: 'echo slow'}
  - name: second
    jobs:
      - {id: needs-breaks, needs: [breaks], runs-on: linux, steps: [{run: 'true'}]}
      - {id: report, needs: [breaks], if: 'failure()', runs-on: linux, steps: [{run: 'true'}]}
      - id: fast-job
        needs: [fine]
        if: "vars.MODE == 'fast'"
        runs-on: linux
        steps: [{run: 'true'}]
"""


def test_conditions_run_and_skip_jobs_and_steps_saying_why():
    build = wait_for_build(services.trigger_build(make_pipeline("conditions", CONDITIONS)))
    jobs = jobs_of(build)
    assert build.status == "FAILED"
    steps = {s.name: s for s in StepRun.objects.filter(job=jobs["breaks"])}
    assert {name: step.status for name, step in steps.items()} == {
        "fails": "FAILED",
        "default": "SKIPPED",
        "on-failure": "SUCCEEDED",
        "always": "SUCCEEDED",
        "guarded": "SKIPPED",
    }
    assert "cleaning up after a failure" in services.step_log(steps["on-failure"], 1)
    assert (jobs["breaks"].status, jobs["breaks"].reason) == ("FAILED", "step 'fails' ended FAILED")
    fine = {s.name: s for s in StepRun.objects.filter(job=jobs["fine"])}
    assert (fine["fast-only"].status, fine["fast-only"].reason) == (
        "SKIPPED",
        "if: vars.MODE == 'fast' was false",
    )
    assert fine["slow-only"].status == "SUCCEEDED"
    assert (jobs["needs-breaks"].status, jobs["needs-breaks"].reason) == (
        "SKIPPED",
        "needs 'breaks', which ended FAILED",
    )
    assert jobs["report"].status == "SUCCEEDED"
    assert (jobs["fast-job"].status, jobs["fast-job"].reason) == (
        "SKIPPED",
        "if: vars.MODE == 'fast' was false",
    )


GRACE = """
stages:
  - name: s
    jobs:
      - id: j
        runs-on: linux
        steps:
          - name: traps
            timeout: 1
            kill-grace: {grace}
            run: |
              # Builtins only: whatever the step forks while it is being stopped gets SIGTERM.
              trap 'end=$((SECONDS + 2)); while [ $SECONDS -lt $end ]; do :; done
                    echo "tidied up after SIGTERM"; exit 0' TERM
              sleep 600 & wait
"""


@pytest.mark.parametrize(("grace", "tidied"), [(6, True), (0, False)])
def test_a_steps_kill_grace_is_the_time_it_gets_after_sigterm(grace, tidied):
    # The agents' own grace here is 3 s: 6 s is longer, 0 kills at once.
    pipeline = make_pipeline(f"grace-{grace}", GRACE.format(grace=grace))
    build = wait_for_build(services.trigger_build(pipeline))
    step = StepRun.objects.get(job__build=build)
    assert (build.status, step.status) == ("FAILED", "TIMED_OUT")
    assert ("tidied up after SIGTERM" in services.step_log(step, 1)) is tidied
