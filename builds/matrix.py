"""A job's `matrix:`: its axes, include and exclude, expanded into the job's runs (as GitHub
Actions does), each with its values, its name and its label. Raises ValueError with a message
for anything a matrix may not be (builds.definition locates it)."""

import itertools
import re
from collections.abc import Callable

MAX_COMBINATIONS = 256  # per job, as GitHub Actions
MAX_AXES = 8
MAX_VALUES = 256  # per axis
MAX_VALUE_LENGTH = 100
MAX_RUN_NAME = 255  # JobRun.key
SETTINGS = ("include", "exclude", "max-parallel", "fail-fast")
AXIS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
# `runs-on: linux-${matrix.db}`: the one place a matrix value is substituted, as it is a
# label, never shell.
REFERENCE_RE = re.compile(r"\$\{\s*matrix\.([A-Za-z_][A-Za-z0-9_]*)\s*\}")


def expand(matrix: dict, job_id: str, runs_on: str, text: Callable[[object], str]) -> dict:
    """The normalized matrix: {"runs": [{"key", "values", "runs_on"}], "max_parallel",
    "fail_fast"}. `text` turns a YAML scalar into a value's text (or raises ValueError)."""
    if not isinstance(matrix, dict) or not matrix:
        raise ValueError("a mapping of axes to lists of values")
    axes = {}
    for name, values in matrix.items():
        if name in SETTINGS:
            continue
        _check_name(name, axes)
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_VALUES:
            raise ValueError(f"{name}: a list of 1 to {MAX_VALUES} values")
        texts = [_value(text, value, name) for value in values]
        if len(set(texts)) != len(texts):
            raise ValueError(f"{name}: a value is listed twice")
        axes[name] = texts
    combinations = [
        dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())
    ]
    if not axes:
        combinations = []
    for n, entry in enumerate(_entries(matrix, "exclude", text)):
        if unknown := sorted(set(entry) - set(axes)):
            raise ValueError(f"exclude[{n}]: {unknown[0]!r} is not an axis of the matrix")
        combinations = [c for c in combinations if any(c[k] != v for k, v in entry.items())]
    originals = list(combinations)  # what an include may extend: not another's addition
    for entry in _entries(matrix, "include", text):
        for name in entry:
            if name not in axes:
                _check_name(name, {})
        _include(combinations, originals, entry, axes)
    if not combinations:
        raise ValueError("no combination is left (every one is excluded)")
    if len(combinations) > MAX_COMBINATIONS:
        raise ValueError(
            f"{len(combinations)} combinations; at most {MAX_COMBINATIONS} are allowed per job"
        )
    _check_env_names(combinations)
    runs = [_run(job_id, values, runs_on) for values in combinations]
    if len({run["key"] for run in runs}) != len(runs):
        raise ValueError("two combinations have the same values")
    return {
        "runs": runs,
        "max_parallel": _max_parallel(matrix.get("max-parallel")),
        "fail_fast": _boolean(matrix.get("fail-fast", True)),
    }


def run_name(job_id: str, values: dict[str, str]) -> str:
    """`test (python=3.11, db=pg15)`."""
    return f"{job_id} ({', '.join(f'{k}={v}' for k, v in values.items())})"


def environment(values: dict[str, str]) -> dict[str, str]:
    """A run's values as the environment gives them: MATRIX_PYTHON, MATRIX_DB."""
    return {f"MATRIX_{name.upper()}": value for name, value in values.items()}


def references(runs_on: str) -> list[str]:
    return REFERENCE_RE.findall(runs_on)


def _check_name(name, axes: dict) -> None:
    if not isinstance(name, str) or not AXIS_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid axis name (letters, digits and _, up to 40, not starting"
            " with a digit)"
        )
    if len(axes) >= MAX_AXES:
        raise ValueError(f"at most {MAX_AXES} axes")


def _value(text, value, where: str) -> str:
    if isinstance(value, list | dict) or value is None:
        raise ValueError(f"{where}: a value is a string, number or boolean")
    value = text(value)
    if not value or len(value) > MAX_VALUE_LENGTH or any(c in value for c in "\n\r\x00"):
        raise ValueError(f"{where}: {value[:40]!r} must be one line of 1 to {MAX_VALUE_LENGTH}")
    return value


def _entries(matrix: dict, key: str, text) -> list[dict[str, str]]:
    entries = matrix.get(key, [])
    if not isinstance(entries, list) or len(entries) > MAX_COMBINATIONS:
        raise ValueError(f"{key}: a list of at most {MAX_COMBINATIONS} mappings")
    result = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"{key}[{n}]: a mapping of axes to values")
        result.append({k: _value(text, v, f"{key}[{n}].{k}") for k, v in entry.items()})
    return result


def _include(combinations: list[dict], originals: list[dict], entry: dict, axes: dict) -> None:
    """GitHub's rule: the entry's extra keys go into every original combination whose axis
    values it matches (never overwriting an axis value, but overwriting what an earlier
    entry added); matching none, it is a combination of its own."""
    original = {k: v for k, v in entry.items() if k in axes}
    extra = {k: v for k, v in entry.items() if k not in axes}
    matched = [c for c in originals if all(c.get(k) == v for k, v in original.items())]
    if matched and extra:
        for combination in matched:
            combination.update(extra)
    elif not matched:
        combinations.append(dict(entry))


def _check_env_names(combinations: list[dict]) -> None:
    names = {name for values in combinations for name in values}
    upper = {}
    for name in sorted(names):
        if (other := upper.setdefault(name.upper(), name)) != name:
            raise ValueError(f"{other!r} and {name!r} are both MATRIX_{name.upper()}")


def _run(job_id: str, values: dict[str, str], runs_on: str) -> dict:
    key = run_name(job_id, values)
    if len(key) > MAX_RUN_NAME:
        raise ValueError(f"the run name {key[:60]!r}... is longer than {MAX_RUN_NAME} characters")

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"runs-on: ${{matrix.{name}}} is not set in {key!r}")
        return values[name]

    return {"key": key, "values": values, "runs_on": REFERENCE_RE.sub(substitute, runs_on)}


def _max_parallel(value) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if not 1 <= number <= MAX_COMBINATIONS:
        raise ValueError(f"max-parallel: a number from 1 to {MAX_COMBINATIONS}")
    return number


def _boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("fail-fast: true or false")
