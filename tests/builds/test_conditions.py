"""builds.conditions: the `if:` conditions of jobs and steps, parsed by our own small parser."""

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builds import conditions
from builds.conditions import (
    DEFAULT,
    MAX_DEPTH,
    MAX_LENGTH,
    Context,
    InvalidCondition,
    evaluate,
    parse,
)

CHECKS = settings(max_examples=300, deadline=None, database=None)

OK = Context()
FAILED = Context(failed=True)
CANCELLED = Context(cancelled=True)
BOTH = Context(failed=True, cancelled=True)

# Each row: the text, then its result when all went well, after a failure, while cancelling,
# and after a failure while cancelling.
STATUS_CASES = [
    ("success()", [True, False, False, False]),
    ("failure()", [False, True, False, False]),
    ("always()", [True, True, True, True]),
    ("cancelled()", [False, False, True, True]),
    ("!cancelled()", [True, True, False, False]),
    ("!success()", [False, True, True, True]),
    ("success() || failure()", [True, True, False, False]),
    ("failure() || cancelled()", [False, True, True, True]),
    ("always() && !failure()", [True, False, True, True]),
    # `!` binds tighter than `&&`: (!failure()) && cancelled(), not !(failure() && cancelled())
    ("!failure() && cancelled()", [False, False, True, True]),
    ("( success( ) )", [True, False, False, False]),
    # No status function anywhere: run as success() && (expr).
    ("vars.X == ''", [True, False, False, False]),
    ("!(vars.X == 'x')", [True, False, False, False]),
    ("true == true", [True, False, False, False]),
    ("vars.X == '' || vars.X == 'x'", [True, False, False, False]),
    # A status function anywhere turns the implicit success() off.
    ("always() && vars.X == ''", [True, True, True, True]),
    ("vars.X == 'x' || failure()", [False, True, False, False]),
]


@pytest.mark.parametrize(("text", "expected"), STATUS_CASES)
def test_status_functions(text, expected):
    assert [evaluate(text, c) for c in (OK, FAILED, CANCELLED, BOTH)] == expected


VALUES = Context(
    vars={"BRANCH": "main", "DEPLOY": "false", "PY": "3.10", "QUOTE": "it's", "EMPTY": ""},
    matrix={"os": "linux", "python": "3.10"},
)

VALUE_CASES = [
    ("vars.BRANCH == 'main'", True),
    ("vars.BRANCH == 'Main'", False),  # exact, case-sensitive
    ("vars.BRANCH != 'main'", False),
    ("'main' == vars.BRANCH", True),
    ("matrix.os == 'linux'", True),
    ("matrix.os != vars.BRANCH", True),
    ("vars.MISSING == ''", True),  # an unknown name is ""
    ("matrix.MISSING != ''", False),
    ("vars.MISSING == matrix.MISSING", True),
    ("vars.EMPTY == vars.MISSING", True),
    ("vars.DEPLOY == false", True),  # false is the text "false"
    ("vars.DEPLOY == 'false'", True),
    ("vars.DEPLOY == true", False),
    ("true == 'true'", True),
    ("vars.PY == 3.10", True),  # numbers keep their text
    ("vars.PY == 3.1", False),
    ("matrix.python == '3.10'", True),
    ("3 == '3'", True),
    ("-1 == '-1'", True),
    ("03 == 3", False),
    ("vars.QUOTE == 'it''s'", True),  # '' is a quote inside a string
    ("'''' == vars.QUOTE", False),
    ("'''' != ''", True),
    ("'a && b || !c' == 'a && b || !c'", True),  # operators inside a string are text
    # && binds tighter than ||: (F && F) || T, not F && (F || T)
    ("vars.BRANCH == 'x' && vars.BRANCH == 'x' || vars.BRANCH == 'main'", True),
    ("vars.BRANCH == 'main' || vars.BRANCH == 'x' && vars.BRANCH == 'x'", True),
    ("(vars.BRANCH == 'main' || vars.BRANCH == 'x') && vars.BRANCH == 'x'", False),
    # ! binds tighter than &&: (!F) && F, not !(F && F)
    ("!vars.BRANCH == 'x' && vars.BRANCH == 'x'", False),
    ("!(vars.BRANCH == 'x' && vars.BRANCH == 'x')", True),
    ("!(vars.BRANCH == 'main' && vars.DEPLOY == 'true')", True),
    ("!!(vars.BRANCH == 'main')", True),
    ("((((matrix.os == 'linux'))))", True),
    ("  vars.BRANCH=='main'&&matrix.os!='mac'  ", True),
    ("vars.BRANCH == 'main'\n  && matrix.os == 'linux'\t", True),
]


@pytest.mark.parametrize(("text", "expected"), VALUE_CASES)
def test_values(text, expected):
    assert evaluate(text, VALUES) is expected


def test_implicit_success_with_values():
    text = "vars.BRANCH == 'main'"
    failed = Context(failed=True, vars=VALUES.vars)
    cancelled = Context(cancelled=True, vars=VALUES.vars)
    assert [evaluate(text, c) for c in (VALUES, failed, cancelled)] == [True, False, False]
    assert evaluate("!cancelled() && " + text, failed) is True


INVALID_CASES = [
    ("", "the condition is empty"),
    (" \t\n ", "the condition is empty"),
    ("vars.DEPLOY", "must be compared, e.g. vars.DEPLOY == 'true'"),
    ("success() && vars.DEPLOY", "vars.DEPLOY at column 14 must be compared"),
    ("(matrix.os) == 'linux'", "matrix.os at column 2 must be compared"),
    ("'yes'", "must be compared"),
    ("true", "must be compared"),
    ("sucess()", "unknown function 'sucess()' at column 1: one of success(), failure(),"),
    ("SUCCESS()", "unknown function 'SUCCESS()'"),
    ("contains(vars.A, 'x')", "unknown function 'contains()'"),
    ("success() )", "unexpected ')' at column 11"),
    ("(success()", "'(' at column 1 is never closed"),
    ("((success() && failure()", "'(' at column 2 is never closed"),
    ("(success() failure())", "unexpected 'failure' at column 12"),
    ("()", "unexpected ')' at column 2"),
    ("success() &&", "unexpected end after '&&' at column 11"),
    ("vars.A ==", "unexpected end after '=='"),
    ("!", "unexpected end after '!'"),
    ("&& success()", "unexpected '&&' at column 1"),
    ("success() || || failure()", "unexpected '||' at column 14"),
    ('vars.A == "main"', "column 11: strings take single quotes"),
    ("vars.A == 'main", "unterminated string starting at column 11"),
    ("vars.A = 'x'", "did you mean '=='?"),
    ("success() & failure()", "did you mean '&&'?"),
    ("success() | failure()", "did you mean '||'?"),
    ("vars.A > 3", "only == and != compare"),
    ("vars.A <= 3", "only == and != compare"),
    ("${{ success() }}", "without ${{ }}"),
    ("env.A == 'x'", "unknown context 'env' at column 1: use vars.NAME or matrix.NAME"),
    ("vars.A.B == 'x'", "invalid name 'vars.A.B'"),
    ("vars.1A == 'x'", "invalid name 'vars.1A'"),
    ("vars. == 'x'", "invalid name 'vars.'"),
    ("matrix.node-version == '18'", "invalid name 'matrix.node-version'"),
    ("vars.A == 1.2.3", "invalid number '1.2.3' at column 11"),
    ("3. == vars.A", "invalid number '3.'"),
    ("vars.A == 1e3", "invalid number '1e3'"),
    ("success(1)", "unexpected '1' at column 9: success() takes no arguments"),
    ("success(", "unexpected end after '('"),
    ("success", "success at column 1 is a function: write success()"),
    ("success() == 'true'", "success() at column 1 cannot be compared"),
    ("vars.A == always()", "always() at column 11 cannot be compared"),
    ("vars.A == vars.B == vars.C", "unexpected '==' at column 18"),
    ("vars.A vars.B", "expected == or != at column 8, found 'vars.B'"),
    ("main == vars.BRANCH", "unknown word 'main' at column 1: quote a string, as in 'main'"),
    ("True == vars.A", "unknown word 'True'"),
    ("vars.A == 'x' vars.B == 'y'", "unexpected 'vars.B' at column 15: join conditions with &&"),
    ("success() success()", "join conditions with && or ||"),
    ("success()\0", "NUL character at column 10"),
    ("success() ¬ failure()", "unexpected '¬' at column 11"),
    ("vars.A == 'x'\x01", "unexpected U+0001 at column 14"),
    ("x" * (MAX_LENGTH + 1), f"condition too long: {MAX_LENGTH + 1} characters, at most"),
    ("(" * 999, "nested too deeply at column 51: at most 50 levels of ( and !"),
    ("!" * 999, "nested too deeply at column 51"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID_CASES)
def test_invalid_conditions(text, fragment):
    with pytest.raises(InvalidCondition) as raised:
        parse(text)
    assert fragment in str(raised.value)


@pytest.mark.parametrize("value", [None, 3, b"success()", ["success()"], {}])
def test_only_text_is_a_condition(value):
    with pytest.raises(InvalidCondition, match="a condition must be text"):
        parse(value)


def test_invalid_condition_is_a_value_error():
    assert issubclass(InvalidCondition, ValueError)


def test_condition_text_names_and_cache():
    condition = parse("  vars.A == matrix.b || vars.A != 'x' && success()\n")
    assert condition.text == "vars.A == matrix.b || vars.A != 'x' && success()"
    assert condition.names() == frozenset({("vars", "A"), ("matrix", "b")})
    assert parse("success()").names() == frozenset()
    assert parse("  vars.A == matrix.b || vars.A != 'x' && success()\n") is condition


def test_default_runs_only_after_success():
    assert [parse(DEFAULT).evaluate(c) for c in (OK, FAILED, CANCELLED, BOTH)] == [
        True,
        False,
        False,
        False,
    ]


def test_limits_are_inclusive():
    assert parse(" " * (MAX_LENGTH - 9) + "success()").evaluate(OK)
    assert parse("(" * MAX_DEPTH + "success()" + ")" * MAX_DEPTH).evaluate(OK)
    assert not parse("!" * (MAX_DEPTH - 1) + "success()").evaluate(OK)
    # A long chain of && or || is not nesting.
    assert parse("&&".join(["success()"] * 90)).evaluate(OK)
    assert parse("||".join(["failure()"] * 89 + ["always()"])).evaluate(OK)


def test_module_is_pure_python():
    tree = ast.parse(Path(conditions.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"collections.abc", "dataclasses", "functools", "re"}
    called = {
        n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and hasattr(n.func, "id")
    }
    assert not called & {"eval", "exec", "compile", "__import__"}


# Property 1: any text parses or is refused with InvalidCondition, saying where.

TOKENS = [
    *("success()", "failure()", "always()", "cancelled()", "success", "sucess()", "()"),
    *("(", ")", "!", "&&", "||", "==", "!=", "&", "|", "=", "<", "$", "{{", "}}"),
    *("vars.A", "matrix.b", "vars.", "vars.a.b", "env.X", "vars", ".", "-", "x"),
    *("'x'", "''", "'it''s'", "'", '"', '"x"', "3", "3.10", "-1", "1.2.3", "true", "false"),
    *(" ", "\t", "\n", "\0", "é", "\x01"),
]
token_soup = st.lists(st.sampled_from(TOKENS), max_size=40).flatmap(
    lambda parts: st.sampled_from(["", " "]).map(lambda sep: sep.join(parts))
)
contexts = st.builds(
    Context,
    failed=st.booleans(),
    cancelled=st.booleans(),
    vars=st.dictionaries(st.sampled_from(["A", "B", "_c1"]), st.sampled_from(["", "x", "3"])),
    matrix=st.dictionaries(st.sampled_from(["A", "b"]), st.sampled_from(["", "x", "3"])),
)
UNPLACED = ("the condition is empty", "condition too long", "a condition must be text")


def check_refusal(text: str, error: InvalidCondition) -> None:
    message = str(error)
    assert message.startswith(UNPLACED) or " at column " in message, message
    for column in map(int, re.findall(r"at column (\d+)", message)):
        assert 1 <= column <= len(text) + 1, message
    if found := re.match(r"unexpected (?:end after )?(.+?) at column (\d+)", message):
        shown, rest = found.group(1), text[int(found.group(2)) - 1 :]
        if not shown.startswith("U+") and "..." not in shown and "\\" not in shown:
            # an operator, a word or a character in quotes; a string token as written
            assert rest.startswith((shown[1:-1], shown)), message


@CHECKS
@given(st.one_of(st.text(max_size=300), token_soup), contexts)
def test_any_text_parses_or_is_refused(text, context):
    try:
        condition = parse(text)
    except InvalidCondition as error:
        check_refusal(text, error)
    else:
        assert condition.evaluate(context) in (True, False)


# Property 2: random trees, rendered with as few parentheses as precedence allows, parse and
# evaluate as a tiny reference evaluator says.

NAMES = ["A", "B", "_c1"]
TEXTS = ["", "main", "true", "false", "3.10", "3.1", "-1", "it's", "''", "a && b"]
NUMBERS = ["3", "3.10", "3.1", "-1", "0"]
operands = st.one_of(
    st.tuples(st.sampled_from(["vars", "matrix"]), st.sampled_from(NAMES)),
    st.tuples(st.just("str"), st.sampled_from(TEXTS)),
    st.tuples(st.just("num"), st.sampled_from(NUMBERS)),
    st.tuples(st.just("bool"), st.sampled_from(["true", "false"])),
)
trees = st.recursive(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(["success", "failure", "always", "cancelled"])),
        st.tuples(st.just("cmp"), operands, st.sampled_from(["==", "!="]), operands),
    ),
    lambda kids: st.one_of(
        st.tuples(st.just("not"), kids),
        st.tuples(st.just("paren"), kids),
        st.tuples(st.sampled_from(["and", "or"]), kids, kids),
    ),
    max_leaves=12,
)
PRECEDENCE = {"or": 1, "and": 2, "not": 3}  # the others are atoms: 4


def render(tree, sep: str) -> tuple[str, int]:
    """The tree's text, and its nesting of ( and !."""
    kind = tree[0]
    if kind == "call":
        return f"{tree[1]}()", 0
    if kind == "cmp":
        return sep.join([render_operand(tree[1]), tree[2], render_operand(tree[3])]), 0
    if kind == "paren":
        text, depth = render(tree[1], sep)
        return f"({sep}{text}{sep})", depth + 1
    if kind == "not":
        text, depth = wrap(tree[1], PRECEDENCE["not"], sep)
        return f"!{sep}{text}", depth + 1
    (left, left_depth), (right, right_depth) = (wrap(k, PRECEDENCE[kind], sep) for k in tree[1:])
    return sep.join([left, "&&" if kind == "and" else "||", right]), max(left_depth, right_depth)


def wrap(tree, precedence: int, sep: str) -> tuple[str, int]:
    text, depth = render(tree, sep)
    if PRECEDENCE.get(tree[0], 4) < precedence:
        return f"({text})", depth + 1
    return text, depth


def render_operand(operand) -> str:
    kind, value = operand
    if kind == "str":
        return "'" + value.replace("'", "''") + "'"
    return f"{kind}.{value}" if kind in ("vars", "matrix") else value


def reference(tree, context: Context) -> bool:
    kind = tree[0]
    if kind == "call":
        failed, cancelled = context.failed, context.cancelled
        return {
            "success": not failed and not cancelled,
            "failure": failed and not cancelled,
            "always": True,
            "cancelled": cancelled,
        }[tree[1]]
    if kind == "cmp":
        left, right = (reference_value(o, context) for o in (tree[1], tree[3]))
        return (left == right) == (tree[2] == "==")
    if kind == "not":
        return not reference(tree[1], context)
    if kind == "paren":
        return reference(tree[1], context)
    results = [reference(k, context) for k in tree[1:]]
    return all(results) if kind == "and" else any(results)


def reference_value(operand, context: Context) -> str:
    kind, value = operand
    if kind in ("vars", "matrix"):
        return getattr(context, kind).get(value, "")
    return value


def walk(tree):
    yield tree
    for part in tree[1:]:
        if isinstance(part, tuple):
            yield from walk(part)


@CHECKS
@given(trees, contexts, st.sampled_from(["", " ", "\n  "]))
def test_rendered_trees_evaluate_as_the_reference(tree, context, sep):
    text, depth = render(tree, sep)
    if len(text) > MAX_LENGTH or depth > MAX_DEPTH:
        with pytest.raises(InvalidCondition):
            parse(text)
        return
    calls_status = any(node[0] == "call" for node in walk(tree))
    implicit = calls_status or (not context.failed and not context.cancelled)
    condition = parse(text)
    assert condition.evaluate(context) is (implicit and reference(tree, context))
    names = {node for node in walk(tree) if node[0] in ("vars", "matrix")}
    assert condition.names() == names


# Property 3: nesting beyond MAX_DEPTH is refused, never a RecursionError; up to it, it works.

openers = st.lists(st.sampled_from(["(", "!", "( "]), max_size=MAX_DEPTH * 3)


@CHECKS
@given(openers, st.sampled_from(["success()", "vars.A == ''"]))
def test_nesting_is_bounded(opening, inner):
    text = "".join(opening) + inner + ")" * sum("(" in o for o in opening)
    if len(opening) > MAX_DEPTH:
        with pytest.raises(InvalidCondition, match="nested too deeply"):
            parse(text)
    else:
        assert parse(text).evaluate(OK) is (opening.count("!") % 2 == 0)
