"""needs, matrix and if: in the definition: what is accepted, its normal form, and the
located refusals."""

import pytest

from builds.definition import parse_definition
from builds.errors import InvalidPipeline


def pipeline(*stages: str) -> str:
    return "stages:\n" + "".join(
        f"  - name: s{n}\n    jobs:\n{jobs}" for n, jobs in enumerate(stages)
    )


def job(id_: str, *extra: str, steps: str = "      steps: [{run: 'true'}]\n") -> str:
    lines = "".join(f"        {line}\n" for line in extra)
    return f"      - id: {id_}\n{lines}{steps.replace('      steps', '        steps')}"


def refused(text: str) -> str:
    with pytest.raises(InvalidPipeline) as caught:
        parse_definition(text)
    return caught.value.detail


def test_needs_and_conditions_are_kept():
    spec = parse_definition(
        pipeline(
            job("a") + job("b", "needs: [a]", "if: \"failure() || vars.X == 'y'\""),
            job("c", "needs: []"),
        )
    )
    a, b = spec["stages"][0]["jobs"]
    c = spec["stages"][1]["jobs"][0]
    assert (a["needs"], a["if"], b["needs"], b["if"]) == (
        None,
        None,
        ["a"],
        "failure() || vars.X == 'y'",
    )
    assert c["needs"] == []
    assert a["steps"][0]["if"] is None


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ((job("a", "needs: [a]"),), "stages[0].jobs[0].needs[0]: a job cannot need itself"),
        ((job("a", "needs: [zz]"),), "stages[0].jobs[0].needs[0]: 'zz' is not a job of this"),
        ((job("a", "needs: [b]"), job("b")), "stages[0].jobs[0].needs[0]: 'b' is in a later"),
        ((job("a", "needs: [b, b]") + job("b"),), "stages[0].jobs[0].needs: a job is listed"),
        (
            (job("a", "needs: [c]") + job("b", "needs: [a]") + job("c", "needs: [b]"),),
            "stages: the needs form a cycle: ",
        ),
        ((job("a", "if: sucess()"),), "stages[0].jobs[0].if: unknown function"),
        (
            (job("a", steps="      steps: [{run: 'true', if: '(('}]\n"),),
            "stages[0].jobs[0].steps[0].if: ",
        ),
        (
            (job("a") + job("b"), job("c", "needs: [b]", "reuse: a")),
            "stages[1].jobs[0].reuse: 'a' is not a job this one waits for",
        ),
    ],
)
def test_order_refusals_are_located(stages, message):
    assert message in refused(pipeline(*stages))


def test_a_cycle_is_refused_naming_its_jobs():
    detail = refused(pipeline(job("a", "needs: [b]") + job("b", "needs: [a]") + job("c")))
    assert detail in (
        "stages: the needs form a cycle: a -> b -> a",
        "stages: the needs form a cycle: b -> a -> b",
    )


def test_reuse_through_needs_is_allowed():
    spec = parse_definition(pipeline(job("a") + job("b", "needs: [a]", "reuse: a")))
    assert spec["stages"][0]["jobs"][1]["reuse"] == "a"


MATRIX = """
        matrix:
          python: ["3.11", "3.12"]
          db: [pg15, pg16, pg17]
          exclude: [{python: "3.11", db: pg17}]
          include: [{python: "3.12", db: pg16, extra: x}, {python: "3.13", db: pg17}]
          max-parallel: 2
"""


def test_matrix_is_expanded_into_named_runs():
    text = pipeline(job("test", "runs-on: linux-${matrix.db}") + MATRIX)
    matrix = parse_definition(text)["stages"][0]["jobs"][0]["matrix"]
    assert [run["key"] for run in matrix["runs"]] == [
        "test (python=3.11, db=pg15)",
        "test (python=3.11, db=pg16)",
        "test (python=3.12, db=pg15)",
        "test (python=3.12, db=pg16, extra=x)",
        "test (python=3.12, db=pg17)",
        "test (python=3.13, db=pg17)",
    ]
    assert matrix["runs"][3]["values"] == {"python": "3.12", "db": "pg16", "extra": "x"}
    assert matrix["runs"][0]["runs_on"] == "linux-pg15"
    assert (matrix["max_parallel"], matrix["fail_fast"]) == (2, True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("matrix: {a: [1, 2], b: [3, 4], exclude: [{a: 1}, {a: 2}]}", "no combination is left"),
        ("matrix: {a: [1, 1]}", "matrix: a: a value is listed twice"),
        ("matrix: {a: []}", "matrix: a: a list of 1 to 256 values"),
        ("matrix: {a: [1], exclude: [{b: 1}]}", "'b' is not an axis"),
        ("matrix: {a: [1], A: [2]}", "'A' and 'a' are both MATRIX_A"),
        ("matrix: {a: [1], max-parallel: 0}", "max-parallel: a number from 1 to 256"),
        ("matrix: {a: [1], fail-fast: maybe}", "fail-fast: true or false"),
        ("matrix: {1a: [1]}", "'1a' is not a valid axis name"),
        ("runs-on: x-${matrix.a}", "(${matrix.NAME} needs a matrix)"),
        ("runs-on: 'x y'", "runs-on: 'x y' is not a label"),
    ],
)
def test_matrix_refusals_are_located(extra, message):
    detail = refused(pipeline(job("t", extra)))
    assert detail.startswith("stages[0].jobs[0]")
    assert message in detail


def test_matrix_beyond_256_combinations_is_refused():
    values = "[" + ", ".join(str(n) for n in range(17)) + "]"
    detail = refused(pipeline(job("t", f"matrix: {{a: {values}, b: {values}}}")))
    assert "289 combinations; at most 256 are allowed per job" in detail


def test_runs_on_naming_a_missing_axis_is_refused():
    detail = refused(pipeline(job("t", "runs-on: x-${matrix.b}", "matrix: {a: [1]}")))
    assert "runs-on: ${matrix.b} is not set in 't (a=1)'" in detail


def test_matrix_jobs_cannot_be_reused():
    detail = refused(pipeline(job("t", "matrix: {a: [1, 2]}"), job("u", "reuse: t")))
    assert "stages[1].jobs[0].reuse: a matrix job cannot reuse or be reused" in detail


def test_priorities_default_to_the_pipelines_own():
    assert parse_definition(pipeline(job("a")))["priority"] == 0
    spec = parse_definition("priority: 3\n" + pipeline(job("a")))
    assert (spec["priority"], spec["max_priority"]) == (3, 3)
    spec = parse_definition("max-priority: 7\n" + pipeline(job("a")))
    assert (spec["priority"], spec["max_priority"]) == (0, 7)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ("priority: 5\nmax-priority: 4\n", "max-priority: below the pipeline's priority of 5"),
        ("priority: 101\n", "priority: Input should be less than or equal to 100"),
        ("max-priority: -1\n", "max-priority: Input should be greater than or equal to 0"),
    ],
)
def test_priority_refusals(head, message):
    assert message in refused(head + pipeline(job("a")))


def test_an_include_extends_only_the_original_combinations():
    text = pipeline(
        job("t", "matrix: {os: [linux], include: [{os: windows}, {os: windows, extra: x}]}")
    )
    runs = parse_definition(text)["stages"][0]["jobs"][0]["matrix"]["runs"]
    assert [run["key"] for run in runs] == [
        "t (os=linux)",
        "t (os=windows)",
        "t (os=windows, extra=x)",
    ]
