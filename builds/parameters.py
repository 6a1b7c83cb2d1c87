"""A pipeline's declared parameters (`parameters:` in its YAML): what a trigger may set. The
pipeline's author decides which variables a build takes from its trigger, and what values:
a user who may only trigger cannot set an environment variable that changes how the step's
tools behave (NODE_OPTIONS, GIT_CONFIG_*, PYTHONPATH, ...), nor a value outside the choices
or the pattern. Patterns are RE2 (google-re2): matched in linear time, whatever the value, so
no pattern makes a trigger slow."""

import functools

import re2

from builds.errors import InvalidVariables

MAX_PATTERN = 500
MAX_CHOICES = 100


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str):
    """The pattern compiled, or ValueError saying why not (RE2 has no backreferences nor
    lookaround)."""
    try:
        return re2.compile(pattern)
    except re2.error as exc:
        raise ValueError(f"{pattern[:60]!r} is not a valid RE2 pattern: {exc}") from None


def refusal(parameter: dict, value: str) -> str | None:
    """Why `value` is not allowed for the parameter, or None."""
    choices, pattern = parameter.get("choices"), parameter.get("pattern")
    if choices is not None and value not in choices:
        return f"{value[:60]!r} is not one of its choices ({', '.join(map(repr, choices))})"
    if pattern is not None and not compile_pattern(pattern).fullmatch(value):
        return f"{value[:60]!r} does not match its pattern {pattern!r}"
    return None


def bind(spec: dict, overrides: dict[str, str]) -> dict[str, str]:
    """The build's variables from the pipeline (its `variables:` and its parameters'
    defaults), given the trigger's `overrides`. With `parameters:` declared, a trigger sets
    only those, each as it allows; without, only the names of its `variables:`. Raises
    InvalidVariables naming the first name it refuses; nothing is stored then."""
    variables, parameters = spec.get("variables", {}), spec.get("parameters", {})
    allowed, kind = (parameters, "parameter") if parameters else (variables, "variable")
    for name, value in overrides.items():
        if name not in allowed:
            raise InvalidVariables(
                f"variables.{name}: not a {kind} of this pipeline, which a trigger may not add"
                f" (its {kind}s: {', '.join(allowed) or 'none'})",
                variable=name,
            )
        if parameters and (why := refusal(parameters[name], value)):
            raise InvalidVariables(f"variables.{name}: {why}", variable=name)
    for name, parameter in parameters.items():
        if name not in overrides and parameter["required"]:
            raise InvalidVariables(f"variables.{name}: required, and not given", variable=name)
    defaults = {n: p["default"] for n, p in parameters.items() if p["default"] is not None}
    return {**variables, **defaults}
