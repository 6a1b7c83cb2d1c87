"""Property-based tests of the pipeline validator: whatever it is given, it answers with a
normalized spec or an INVALID_PIPELINE error, never with another exception."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builds.definition import parse_definition
from builds.errors import InvalidPipeline

KEYS = [
    "stages", "jobs", "steps", "variables", "concurrency", "name", "id", "run", "runs-on",
    "timeout", "retry", "continue-on-error", "reuse", "unknown", "",
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
        "retry": st.integers(min_value=0, max_value=10),
        "continue-on-error": st.booleans(),
    },
)


@st.composite
def pipelines(draw):
    ids = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), min_size=1,
                        max_size=6, unique=True))  # fmt: skip
    stages, at = [], 0
    while at < len(ids):
        size = draw(st.integers(min_value=1, max_value=len(ids) - at))
        jobs = [{"id": i, "steps": draw(st.lists(STEPS, min_size=1, max_size=3))}
                for i in ids[at : at + size]]  # fmt: skip
        stages.append({"name": f"stage{len(stages)}", "jobs": jobs})
        at += size
    variables = draw(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True),
                                     PLAIN, max_size=4))  # fmt: skip
    return {"variables": variables, "stages": stages}


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
