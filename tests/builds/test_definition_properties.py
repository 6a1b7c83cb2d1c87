"""Property-based tests of the pipeline validator: whatever it is given, it answers with a
normalized spec or an INVALID_PIPELINE error, never with another exception."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builds import parameters
from builds.definition import is_reserved_variable_name, parse_definition
from builds.errors import InvalidPipeline, InvalidVariables

KEYS = [
    "stages", "jobs", "steps", "variables", "concurrency", "name", "id", "run", "runs-on",
    "timeout", "retry", "continue-on-error", "reuse", "unknown", "", "max-processes",
    "max-memory", "parameters", "default", "required", "choices", "pattern", "description",
]  # fmt: skip
NAMES = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), NAMES), children, max_size=5),
    ),
    max_leaves=25,
)
CHECKS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Text a step or variable may hold: no control characters (a NUL cannot reach an environment
# variable, and PyYAML folds some line breaks, such as U+0085, on the way through).
PLAIN = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)


def answer(text):
    """The spec, or None for a refusal, which must be an INVALID_PIPELINE with a message."""
    try:
        return parse_definition(text)
    except InvalidPipeline as exc:
        refusal = exc
    assert (refusal.code, bool(refusal.detail)) == ("INVALID_PIPELINE", True)
    return None


@CHECKS
@given(st.text(max_size=400))
def test_any_text_gets_a_spec_or_invalid_pipeline(text):
    answer(text)


@CHECKS
@given(TREES)
def test_any_yaml_document_gets_a_spec_or_invalid_pipeline(tree):
    answer(yaml.safe_dump(tree, allow_unicode=True))


@CHECKS
@given(st.binary(max_size=200))
def test_any_bytes_decoded_get_a_spec_or_invalid_pipeline(data):
    answer(data.decode("utf-8", "surrogateescape"))
    answer(data)  # not even text


STEPS = st.fixed_dictionaries(
    {"run": PLAIN.filter(str.strip)},
    optional={
        "timeout": st.integers(min_value=1, max_value=3600),
        "retry": st.one_of(
            st.integers(min_value=0, max_value=10),
            st.fixed_dictionaries(
                {"max": st.integers(min_value=0, max_value=10)},
                optional={
                    "on": st.sampled_from([("failure",), ("timeout",), ("failure", "timeout")]).map(
                        list
                    ),
                    "backoff": st.integers(min_value=0, max_value=600),
                },
            ),
        ),
        "continue-on-error": st.booleans(),
        "max-processes": st.integers(min_value=1, max_value=10**6),
        "max-memory": st.sampled_from(["1M", "64M", "2G", "1GiB", "1048576"]),
    },
)
PARAMETERS = st.one_of(
    st.fixed_dictionaries({}, optional={"default": PLAIN, "description": PLAIN}),
    st.fixed_dictionaries(
        {"choices": st.lists(PLAIN, min_size=1, max_size=4, unique=True)},
        optional={"required": st.booleans()},
    ),
    st.fixed_dictionaries(
        {"pattern": st.sampled_from(["[a-z]+", "[0-9]{1,3}", ".*", "(a|b)+c?"])},
        optional={"required": st.booleans()},
    ),
)


@st.composite
def pipelines(draw):
    ids = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), min_size=1,
                        max_size=6, unique=True))  # fmt: skip
    stages, at = [], 0
    while at < len(ids):
        size = draw(st.integers(min_value=1, max_value=len(ids) - at))
        jobs = [{"id": i, "steps": draw(st.lists(STEPS, min_size=1, max_size=3)),
                 **draw(st.fixed_dictionaries({}, optional={"timeout": st.integers(1, 3600)}))}
                for i in ids[at : at + size]]  # fmt: skip
        stages.append({"name": f"stage{len(stages)}", "jobs": jobs})
        at += size
    # Variables never start with P, which parameters do: a name is one or the other.
    # (nor a reserved one: LD_*, CI_*, HOME, ...)
    names = st.from_regex(r"[A-OQ-Z][A-Z0-9_]{0,8}", fullmatch=True).filter(
        lambda name: not is_reserved_variable_name(name)
    )
    variables = draw(st.dictionaries(names, PLAIN, max_size=4))
    parameter_names = st.from_regex(r"P[A-Z0-9_]{0,8}", fullmatch=True).filter(
        lambda name: not is_reserved_variable_name(name)  # PS4, PATH, ...
    )
    declared = draw(st.dictionaries(parameter_names, PARAMETERS, max_size=3))
    return {"variables": variables, "parameters": declared, "stages": stages}


@CHECKS
@given(pipelines())
def test_a_valid_pipeline_is_accepted_and_keeps_its_shape(pipeline):
    spec = parse_definition(yaml.safe_dump(pipeline, allow_unicode=True))
    assert [[j["id"] for j in s["jobs"]] for s in spec["stages"]] == [
        [j["id"] for j in s["jobs"]] for s in pipeline["stages"]
    ]
    assert spec["variables"] == pipeline["variables"]
    for stage, given_stage in zip(spec["stages"], pipeline["stages"], strict=True):
        for job, given_job in zip(stage["jobs"], given_stage["jobs"], strict=True):
            runs = [step["run"] for step in job["steps"]]
            assert runs == [step["run"] for step in given_job["steps"]]


@CHECKS
@given(pipelines(), st.dictionaries(st.sampled_from(["PA", "PB", "PX", "A"]), PLAIN, max_size=3))
def test_any_trigger_is_bound_or_refused_and_what_is_bound_is_allowed(pipeline, values):
    spec = parse_definition(yaml.safe_dump(pipeline, allow_unicode=True))
    try:
        defaults = parameters.bind(spec, values)
    except InvalidVariables as exc:
        refused = exc.detail
    else:
        refused = None
    if refused is not None:
        assert refused.startswith("variables.")
        return
    declared = spec["parameters"]
    for name, value in {**defaults, **values}.items():
        if name in declared:
            assert parameters.refusal(declared[name], value) is None
    assert set(values) <= set(declared or spec["variables"])  # without parameters, its variables
