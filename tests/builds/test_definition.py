import pytest

from builds.definition import MAX_VARIABLE_VALUE, normalize_variables, parse_definition
from builds.errors import InvalidPipeline, InvalidVariables

VALID = """
variables:
  GREETING: hello
  COUNT: 3
  FLAG: true
stages:
  - name: build
    jobs:
      - id: compile
        runs-on: linux
        steps:
          - name: say
            run: echo "$GREETING"
            timeout: 300
            retry: 1
            continue-on-error: false
          - run: make
  - name: test
    jobs:
      - id: unit
        steps:
          - run: make test
"""


def test_valid_definition_is_normalized():
    spec = parse_definition(VALID)
    assert spec["variables"] == {"GREETING": "hello", "COUNT": "3", "FLAG": "true"}
    compile_job = spec["stages"][0]["jobs"][0]
    assert compile_job["runs_on"] == "linux"
    assert compile_job["steps"][0] == {
        "name": "say",
        "run": 'echo "$GREETING"',
        "if": None,
        "timeout": 300,
        "retry": 1,
        "retry_rule": None,
        "continue_on_error": False,
        "max_processes": None,
        "max_memory": None,
        "kill_grace": None,
    }
    assert compile_job["steps"][1]["name"] == "step 2"
    assert compile_job["steps"][1]["timeout"] == 3600
    assert compile_job["timeout"] is None  # none of its own: each step's only
    unit = spec["stages"][1]["jobs"][0]
    assert (unit["runs_on"], unit["steps"][0]["retry"]) == ("default", 0)


@pytest.mark.parametrize(
    ("text", "place"),
    [
        ("stages: [", "not valid YAML"),
        ("- a\n- b", "top level must be a mapping"),
        ("", "non-empty"),
        ("variables: {}", "stages: required"),
        ("stages: []", "stages: List should have at least 1 item"),
        ("stages:\n  - name: s\n    jobs: []", "stages[0].jobs"),
        ("stages:\n  - name: s\n    jobz: []", "stages[0].jobz: unknown key"),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
            "          - run: x\n            timeout: 0",
            "stages[0].jobs[0].steps[0].timeout",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
            "          - run: x\n            retry: 11",
            "stages[0].jobs[0].steps[0].retry",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
            "          - run: x\n            timeout: ten",
            "stages[0].jobs[0].steps[0].timeout",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
            "          - run: x\n            max-processes: 0",
            "stages[0].jobs[0].steps[0].max-processes",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
            "          - run: x\n            max-memory: 1.5G",
            "stages[0].jobs[0].steps[0].max-memory: '1.5G' is not a size",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
            "          - run: x\n            max-memory: 512K",
            "stages[0].jobs[0].steps[0].max-memory: '512K' is out of range: from 1M to 1T",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - {id: a, timeout: 0, steps: [{run: x}]}",
            "stages[0].jobs[0].timeout",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a b\n        steps: [{run: x}]",
            "stages[0].jobs[0].id",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        runs-on: 'x;rm'\n"
            "        steps: [{run: x}]",
            "stages[0].jobs[0].runs-on",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - {id: a, steps: [{run: x}]}\n"
            "  - name: t\n    jobs:\n      - {id: a, steps: [{run: y}]}",
            "stages[1].jobs[0].id: duplicate job id 'a'",
        ),
        (
            "stages:\n  - name: s\n    jobs:\n      - {id: a, steps: [{run: x}]}\n"
            "  - name: s\n    jobs:\n      - {id: b, steps: [{run: y}]}",
            "stages[1].name: duplicate stage name 's'",
        ),
        ("variables:\n  1BAD: x\nstages: []", "variables"),
        ("variables:\n  CI_BUILD_ID: x\nstages: []", "reserved"),
        ("variables:\n  A: [1]\nstages: []", "variables.A"),
        ("a: &x [1]\nb: *x\nstages: []", "aliases"),
        ("stages: []\nstages: []", "duplicate key 'stages'"),
        ("stages: !!python/object:os.system x", "tags such as"),
        ("variables:\n  A: !!bool maybe\nstages: []", "tags such as"),
        ("variables:\n  A: !!timestamp nope\nstages: []", "tags such as"),
        ('variables:\n  A: "x\\0y"\nstages: []', "NUL characters"),
        ("variables:\n  PATH: /tmp/evil\nstages: []", "reserved"),
        ("variables:\n  BASH_ENV: x\nstages: []", "reserved"),
        ("variables:\n  A: ~\nstages: []", "variables.A"),
    ],
)
def test_invalid_definitions_name_the_place(text, place):
    with pytest.raises(InvalidPipeline) as err:
        parse_definition(text)
    assert err.value.code == "INVALID_PIPELINE"
    assert place in err.value.detail


@pytest.mark.parametrize(
    ("written", "size"),
    [("64M", 64 * 1024**2), ("2G", 2 * 1024**3), ("1GiB", 1024**3), ("1048576", 1024**2)],
)
def test_step_limits_are_normalized(written, size):
    spec = parse_definition(
        "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
        f"          - run: x\n            max-memory: {written}\n            max-processes: 64"
    )
    step = spec["stages"][0]["jobs"][0]["steps"][0]
    assert (step["max_memory"], step["max_processes"]) == (size, 64)


@pytest.mark.parametrize(
    ("retry", "count", "rule"),
    [
        ("2", 2, None),
        ("{max: 2}", 2, None),
        ("{max: 3, on-exit-codes: [75, 1], backoff: 10}", 3,
         {"on": ["failure", "timeout"], "on_exit_codes": [75, 1], "backoff": 10}),
        ("{max: 1, on: [timeout]}", 1, {"on": ["timeout"], "on_exit_codes": None, "backoff": 0}),
    ],
)  # fmt: skip
def test_retry_rules_are_normalized(retry, count, rule):
    spec = parse_definition(
        "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
        f"          - run: x\n            retry: {retry}"
    )
    step = spec["stages"][0]["jobs"][0]["steps"][0]
    assert (step["retry"], step["retry_rule"]) == (count, rule)


@pytest.mark.parametrize(
    ("retry", "detail"),
    [
        (
            "{max: 3, on: [lost]}",
            "retry.on[0]: Input should be 'failure', 'timeout' or 'agent-lost'",
        ),
        ("{max: 3, on: [timeout], on-exit-codes: [1]}", "retry: on-exit-codes: only a failure"),
        ("{on: [failure]}", "retry.max: required"),
        ("{max: 2, on-exit-codes: [256]}", "retry.on-exit-codes[0]"),
        ("{max: 2, backoff: 601}", "retry.backoff"),
        ("{max: 2, jitter: 1}", "retry.jitter: unknown key"),
    ],
)
def test_invalid_retry_rules_name_the_place(retry, detail):
    with pytest.raises(InvalidPipeline) as refused:
        parse_definition(
            "stages:\n  - name: s\n    jobs:\n      - id: a\n        steps:\n"
            f"          - run: x\n            retry: {retry}"
        )
    assert refused.value.detail.startswith(f"stages[0].jobs[0].steps[0].{detail}")


def test_scalars_are_read_as_written():
    spec = parse_definition(
        "variables:\n  V: 1.10\n  N: no\n  M: 0777\n  T: 1:30\n"
        "stages:\n  - name: s\n    jobs:\n      - id: j\n        steps:\n"
        "          - {run: x, timeout: '30', retry: 2, continue-on-error: yes}\n"
    )
    assert spec["variables"] == {"V": "1.10", "N": "no", "M": "0777", "T": "1:30"}
    step = spec["stages"][0]["jobs"][0]["steps"][0]
    assert (step["timeout"], step["retry"], step["continue_on_error"]) == (30, 2, True)


def test_caps_refuse_huge_definitions():
    jobs = "".join(f"      - {{id: j{i}, steps: [{{run: x}}]}}\n" for i in range(501))
    with pytest.raises(InvalidPipeline, match="at most 500"):
        parse_definition(f"stages:\n  - name: s\n    jobs:\n{jobs}")
    with pytest.raises(InvalidPipeline, match="larger than"):
        parse_definition("stages: []\n#" + "x" * 300_000)


def test_non_string_definition_is_refused():
    with pytest.raises(InvalidPipeline):
        parse_definition(None)


def test_variables_are_checked():
    assert normalize_variables({"A": 1, "B": False, "C": "x"}) == {"A": "1", "B": "false", "C": "x"}
    for bad, message in [
        ({"a-b": "x"}, "not a valid name"),
        ({"ci_x": "x"}, "reserved"),
        ({"LD_PRELOAD": "/x.so"}, "reserved"),
        ({"ifs": " "}, "reserved"),
        ({"A": None}, "must be a string"),
        ({"A": "x\x00y"}, "NUL"),
        ({"A": "x" * (MAX_VARIABLE_VALUE + 1)}, "larger than"),
        ({f"V{i}": "x" for i in range(201)}, "at most 200"),
        ([("A", "x")], "must be a mapping"),
        ({"A": "\udcff"}, "UTF-8"),
    ]:
        with pytest.raises(InvalidVariables, match=message):
            normalize_variables(bad)
