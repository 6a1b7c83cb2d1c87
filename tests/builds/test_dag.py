"""builds.dag: what starts when, what is skipped and why, fail-fast, max-parallel; and, over
generated pipelines, that a build always comes to an end."""

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from builds import dag
from builds.definition import parse_definition
from builds.statuses import RUN_FINAL

P, Q, R, S, F = "PENDING", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED"


def run(key, stage=0, status=P, needs=None, condition="", job=None, **matrix):
    return dag.Run(key, job or key, stage, status, needs, condition, matrix)


def test_stages_wait_for_the_whole_earlier_stage():
    runs = [run("a"), run("b"), run("c", stage=1)]
    assert dag.plan(runs).start == ["a", "b"]
    runs = [run("a", status=S), run("b", status=R), run("c", stage=1)]
    assert dag.plan(runs).start == []
    runs = [run("a", status=S), run("b", status=S), run("c", stage=1)]
    assert dag.plan(runs).start == ["c"]


def test_needs_start_a_job_before_the_rest_of_the_earlier_stage():
    runs = [run("a", status=S), run("slow", status=R), run("b", stage=1, needs=("a",))]
    assert dag.plan(runs).start == ["b"]


def test_a_failure_skips_what_needs_it_and_the_later_stages_with_reasons():
    runs = [
        run("a", status=F),
        run("b", needs=("a",)),
        run("c", needs=("b",)),
        run("notify", needs=("c",), condition="failure()"),
        run("later", stage=1),
    ]
    plan = dag.plan(runs)
    assert plan.skip == {
        "b": "needs 'a', which ended FAILED",
        "c": "needs 'b', which was SKIPPED after 'a' ended FAILED",
    }
    assert plan.start == ["notify"]  # failure() sees the failure through the skipped jobs
    assert plan.outcome is None  # `later` waits for `notify`, then skips
    runs = [run(r.key, status="SKIPPED") for r in runs[1:3]] + [runs[0]]
    runs += [run("notify", status=S), run("later", stage=1)]
    plan = dag.plan(runs)
    assert plan.skip == {"later": "waited for the earlier stages, where 'a' ended FAILED"}
    assert (plan.start, plan.outcome) == ([], F)


def test_after_a_cancel_only_what_holds_then_runs_once_its_wait_is_over():
    runs = [
        run("work", status=R),  # being stopped
        run("queued", status=Q, needs=()),
        run("queued-notify", status=Q, needs=(), condition="always()"),
        run("later", stage=1),
        run("by-vars", stage=1, condition="vars.X == 'y'"),
        run("on-failure", stage=1, condition="failure()"),
        run("notify", stage=1, condition="cancelled()"),
    ]
    plan = dag.plan(runs, cancelled=True)
    assert plan.cancel == {
        "queued": "the build was cancelled",
        "later": "the build was cancelled",
        "by-vars": "the build was cancelled",
    }  # at once: without a status function, a condition cannot hold after a cancel
    assert (plan.start, plan.clean, plan.skip) == ([], ["queued-notify"], {})  # the rest waits
    runs = [run("work", status="CANCELED"), run("on-failure", stage=1, condition="failure()")]
    runs += [run("not-cancelled", stage=1, condition="!cancelled()")]
    runs += [run("not-success", stage=1, condition="!success()")]
    runs.append(run("notify", stage=1, condition="cancelled() && vars.X == 'y'"))
    plan = dag.plan(runs, variables=lambda: {"X": "y"}, cancelled=True)
    assert plan.start == ["not-success", "notify"]
    assert plan.cancel == {
        "on-failure": "the build was cancelled, and if: failure() was false",
        "not-cancelled": "the build was cancelled, and if: !cancelled() was false",
    }


def test_after_a_cancel_max_parallel_still_bounds_a_matrix():
    runs = [run("work", status="CANCELED")]
    runs += [run(f"t{n}", stage=1, condition="always()", job="t") for n in range(4)]
    plan = dag.plan(runs, {"t": dag.MatrixRule(max_parallel=2)}, cancelled=True)
    assert plan.start == ["t0", "t1"]


def test_a_job_skipped_by_its_condition_skips_what_needs_it_not_later_stages():
    runs = [
        run("deploy", condition="vars.BRANCH == 'main'"),
        run("announce", needs=("deploy",)),
        run("always", needs=("deploy",), condition="always()"),
        run("later", stage=1),
    ]
    plan = dag.plan(runs, variables=lambda: {"BRANCH": "dev"})
    assert plan.skip == {
        "deploy": "if: vars.BRANCH == 'main' was false",
        "announce": "needs 'deploy', which was SKIPPED",
    }
    assert plan.start == ["always"]  # `later` waits for it


def test_variables_are_read_only_when_a_condition_reads_them():
    def unwanted():
        raise AssertionError("read")

    assert dag.plan([run("a"), run("b", condition="always()")], variables=unwanted).start == [
        "a",
        "b",
    ]


def test_the_build_ends_failed_when_anything_failed():
    assert dag.plan([run("a", status=S), run("b", status="SKIPPED")]).outcome == S
    assert dag.plan([run("a", status=F), run("b", status=S)]).outcome == F
    assert dag.plan([run("a", status=F), run("b", needs=("a",))]).outcome == F


def test_max_parallel_bounds_the_live_runs_of_a_matrix():
    rules = {"t": dag.MatrixRule(max_parallel=2)}
    runs = [run(f"t ({n})", job="t") for n in range(5)]
    assert dag.plan(runs, rules).start == ["t (0)", "t (1)"]
    runs[0] = run("t (0)", job="t", status=S)
    runs[1] = run("t (1)", job="t", status=R)
    assert dag.plan(runs, rules).start == ["t (2)"]


def test_fail_fast_cancels_the_other_runs_of_the_matrix():
    runs = [
        run("t (0)", job="t", status=F),
        run("t (1)", job="t", status=R),
        run("t (2)", job="t"),
        run("t (3)", job="t", status=S),
        run("next", stage=1),
    ]
    plan = dag.plan(runs, {"t": dag.MatrixRule()})
    assert plan.cancel == {
        "t (1)": "fail-fast: 't (0)' ended FAILED",
        "t (2)": plan.cancel["t (1)"],
    }
    assert plan.skip == {}  # `next` waits for `t (1)` to be stopped on its agent
    assert dag.plan(runs, {"t": dag.MatrixRule(fail_fast=False)}).cancel == {}


def test_a_matrix_run_sees_its_values_in_conditions():
    runs = [run("t (a=1)", job="t", condition="matrix.a == '1'", a="1")]
    runs.append(run("t (a=2)", job="t", condition="matrix.a == '1'", a="2"))
    plan = dag.plan(runs)
    assert (plan.start, list(plan.skip)) == (["t (a=1)"], ["t (a=2)"])


# Generated pipelines: stages of jobs, each with needs on jobs of its own or earlier stages
# (acyclic by construction: a job needs only jobs defined before it), conditions and
# matrices. Whatever each run's outcome, and whenever the build is cancelled, planning and
# ending runs always ends the build, and nothing starts before what it waits for has ended.


@st.composite
def pipelines(draw):
    stages, defined = [], []
    for s in range(draw(st.integers(1, 4))):
        jobs = []
        for j in range(draw(st.integers(1, 4))):
            job_id = f"j{s}_{j}"
            job = {"id": job_id, "steps": [{"run": "true"}]}
            if defined and draw(st.booleans()):
                job["needs"] = draw(st.lists(st.sampled_from(defined), unique=True, max_size=3))
            if draw(st.integers(0, 3)) == 0:
                job["if"] = draw(
                    st.sampled_from(["always()", "failure()", "success()", "cancelled()"])
                )
            if draw(st.integers(0, 4)) == 0:
                job["matrix"] = {"a": [1, 2, 3], "max-parallel": draw(st.integers(1, 3))}
            jobs.append(job)
            defined.append(job_id)
        stages.append({"name": f"s{s}", "jobs": jobs})
    return {"stages": stages}


@settings(max_examples=150, deadline=None)
@given(pipelines(), st.randoms(use_true_random=False))
def test_generated_pipelines_never_deadlock(document, random):
    spec = parse_definition(yaml.safe_dump(document))
    runs, rules = [], {}
    for s, stage in enumerate(spec["stages"]):
        for job in stage["jobs"]:
            needs = None if job["needs"] is None else tuple(job["needs"])
            matrix = job["matrix"]
            if matrix:
                rules[job["id"]] = dag.MatrixRule(matrix["max_parallel"], matrix["fail_fast"])
            for key in [r["key"] for r in matrix["runs"]] if matrix else [job["id"]]:
                runs.append(dag.Run(key, job["id"], s, P, needs, job["if"] or ""))
    status = {r.key: P for r in runs}
    ended_at: dict[str, int] = {}
    cancelled = False
    for tick in range(50 * len(runs) + 2):
        cancelled = cancelled or random.random() < 0.05
        plan = dag.plan(
            [r.__class__(**{**r.__dict__, "status": status[r.key]}) for r in runs],
            rules,
            cancelled=cancelled,
        )
        assert not (cancelled and plan.skip)  # after a cancel, what does not run is CANCELED
        for key in plan.skip:
            status[key], ended_at[key] = "SKIPPED", tick
        for key in plan.cancel:
            if status[key] != R:
                status[key], ended_at[key] = "CANCELED", tick
        for key in plan.start:
            job_run = next(r for r in runs if r.key == key)
            waited = (
                [r.key for r in runs if r.stage < job_run.stage]
                if job_run.needs is None
                else [r.key for r in runs if r.job in job_run.needs]
            )
            assert all(k in ended_at for k in waited), f"{key} started before what it waits for"
        if plan.outcome:
            assert all(s in RUN_FINAL for s in status.values())
            return
        for key in plan.start:
            status[key] = Q
        live = [key for key, s in status.items() if s in (Q, R)]
        assert live, "nothing runs and the build has not ended: a deadlock"
        for key in live:  # some of what is live ends now, well or badly
            if status[key] == R and key in plan.cancel:
                status[key], ended_at[key] = "CANCELED", tick
            elif random.random() < 0.5:
                status[key], ended_at[key] = random.choice([S, S, F]), tick
            else:
                status[key] = R
    raise AssertionError("the build never ended")


def test_unreadable_variables_skip_what_needs_them_saying_why():
    def gone():
        raise dag.VariablesUnavailable("the variables of build #1 are gone")

    runs = [run("a", condition="vars.X == 'y'"), run("b")]
    plan = dag.plan(runs, variables=gone)
    assert (plan.start, plan.skip) == (["b"], {"a": "the variables of build #1 are gone"})
