"""The `if:` conditions of jobs and steps, as in GitHub Actions. A small parser of our own, never
eval: a pipeline can only compare values and call the four status functions.

    or := and ('||' and)*        and := unary ('&&' unary)*        unary := '!' unary | primary
    primary := '(' or ')' | success() | failure() | always() | cancelled() | value (==|!=) value
    value := vars.NAME | matrix.NAME | 'string' ('' for a quote) | number | true | false

Every value is text, compared exactly: a number keeps its text ("3.10" is not "3.1"), true and
false are the texts "true" and "false", an unknown name is "". As in GitHub Actions, an
expression that calls no status function runs as `success() && (expr)`."""

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_LENGTH = 1000
MAX_DEPTH = 50  # nesting of ( and !: the parser and evaluator recurse, so it is bounded
DEFAULT = "success()"


class InvalidCondition(ValueError):
    pass


@dataclass(frozen=True)
class Context:
    failed: bool = False  # something before it failed
    cancelled: bool = False  # the build is being cancelled
    skipped: bool = False  # a job it needs was skipped: not a failure, not a success either
    vars: Mapping[str, str] = field(default_factory=dict)
    matrix: Mapping[str, str] = field(default_factory=dict)


STATUS = {
    "success": lambda c: not c.failed and not c.cancelled and not c.skipped,
    "failure": lambda c: bool(c.failed) and not c.cancelled,
    "always": lambda c: True,
    "cancelled": lambda c: bool(c.cancelled),
}


@dataclass(frozen=True)
class Name:
    scope: str  # "vars" or "matrix"
    name: str


@dataclass(frozen=True)
class Status:
    function: str

    def evaluate(self, context: Context) -> bool:
        return STATUS[self.function](context)


@dataclass(frozen=True)
class Compare:
    left: str | Name  # a str is a literal
    equal: bool  # == rather than !=
    right: str | Name

    def evaluate(self, context: Context) -> bool:
        return (_value(self.left, context) == _value(self.right, context)) == self.equal


def _value(operand: str | Name, context: Context) -> str:
    if isinstance(operand, str):
        return operand
    return getattr(context, operand.scope).get(operand.name, "")


@dataclass(frozen=True)
class Not:
    operand: "Node"

    def evaluate(self, context: Context) -> bool:
        return not self.operand.evaluate(context)


@dataclass(frozen=True)
class Join:  # a && b && ... or a || b || ...: flat, so a long chain is not a deep tree
    all: bool  # && rather than ||
    operands: tuple["Node", ...]

    def evaluate(self, context: Context) -> bool:
        results = (o.evaluate(context) for o in self.operands)
        return all(results) if self.all else any(results)


Node = Status | Compare | Not | Join


@dataclass(frozen=True)
class Condition:
    text: str
    tree: Node = field(repr=False)
    reads: frozenset[tuple[str, str]] = field(repr=False)
    calls_status: bool = field(repr=False)

    def names(self) -> frozenset[tuple[str, str]]:
        return self.reads

    def evaluate(self, context: Context) -> bool:
        if not self.calls_status and not STATUS["success"](context):
            return False
        return self.tree.evaluate(context)


_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<op>&&|\|\||==|!=|[!()])|(?P<str>'(?:[^']|'')*')|(?P<word>[A-Za-z0-9_.-]+)"
)
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HINTS = {"&": ": did you mean '&&'?", "|": ": did you mean '||'?", "=": ": did you mean '=='?"}
_HINTS |= {'"': ": strings take single quotes, as in 'main'", "<": ": only == and != compare"}
_HINTS |= {">": _HINTS["<"], "$": ": write the condition without ${{ }}"}


@dataclass(frozen=True)
class _Token:
    kind: str  # the operator itself, "str", "word", "end" or "bad"
    text: str
    col: int  # 1-based, in the text as written (before stripping)

    def __str__(self) -> str:
        shown = self.text if len(self.text) <= 30 else self.text[:27] + "..."
        return "the end" if self.kind == "end" else shown if self.kind == "str" else f"'{shown}'"


def _tokenize(text: str) -> list[_Token]:
    """The tokens, ending with "end", or with "bad" at the first character that starts none:
    the parser reports that only when it gets there, so errors come in the order written."""
    tokens, pos = [], 0
    while pos < len(text):
        if (m := _TOKEN.match(text, pos)) is None:
            char, col = text[pos], pos + 1
            shown = repr(char) if char.isprintable() else f"U+{ord(char):04X}"
            bad = f"unexpected {shown} at column {col}{_HINTS.get(char, '')}"
            if char == "'":
                bad = f"unterminated string starting at column {col}"
            return [*tokens, _Token("bad", bad, col)]
        if m.lastgroup != "space":
            tokens.append(_Token(m.group("op") or m.lastgroup, m.group(), pos + 1))
        pos = m.end()
    return [*tokens, _Token("end", "", len(text) + 1)]


class _Parser:
    def __init__(self, text: str):
        self.tokens, self.i, self.depth = _tokenize(text), 0, 0
        self.reads: set[tuple[str, str]] = set()
        self.calls_status = False

    def peek(self) -> _Token:
        if (tok := self.tokens[min(self.i, len(self.tokens) - 1)]).kind == "bad":
            raise InvalidCondition(tok.text)
        return tok

    def take(self) -> _Token:
        tok = self.peek()
        self.i += 1
        return tok

    def fail(self, tok: _Token, hint: str = "") -> InvalidCondition:
        if tok.kind == "end":
            last = self.tokens[-2]
            return InvalidCondition(f"unexpected end after {last} at column {last.col}")
        return InvalidCondition(f"unexpected {tok} at column {tok.col}{hint}")

    def join(self, all_: bool) -> Node:
        below, op = (self.unary, "&&") if all_ else (lambda: self.join(True), "||")
        operands = [below()]
        while self.peek().kind == op:
            self.take()
            operands.append(below())
        return operands[0] if len(operands) == 1 else Join(all_, tuple(operands))

    def unary(self) -> Node:
        tok = self.take()
        if tok.kind in ("!", "("):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                limit = f"at most {MAX_DEPTH} levels of ( and !"
                raise InvalidCondition(f"nested too deeply at column {tok.col}: {limit}")
            node = Not(self.unary()) if tok.kind == "!" else self.join(False)
            if tok.kind == "(" and (close := self.take()).kind != ")":
                if close.kind == "end":
                    raise InvalidCondition(f"'(' at column {tok.col} is never closed")
                raise self.fail(close, ": expected ')' or && or ||")
            self.depth -= 1
            return node
        if tok.text in STATUS and self.peek().kind == "(":
            self.take()
            if (close := self.take()).kind != ")":
                raise self.fail(close, f": {tok.text}() takes no arguments")
            if self.peek().kind in ("==", "!="):
                raise InvalidCondition(f"{tok.text}() at column {tok.col} cannot be compared")
            self.calls_status = True
            return Status(tok.text)
        left, op = self.operand(tok), self.take()
        if op.kind in ("==", "!="):
            return Compare(left, op.kind == "==", self.operand(self.take()))
        if op.kind in ("end", "&&", "||", ")"):
            raise InvalidCondition(
                f"{tok.text} at column {tok.col} must be compared, e.g. {tok.text} == 'true'"
            )
        raise InvalidCondition(f"expected == or != at column {op.col}, found {op}")

    def operand(self, tok: _Token) -> str | Name:
        text, at = tok.text, f"at column {tok.col}"
        if tok.kind == "str":
            return text[1:-1].replace("''", "'")
        if tok.kind != "word":
            raise self.fail(tok)
        if _NUMBER.fullmatch(text) or text in ("true", "false"):
            return text
        if text[0] in "-.0123456789":
            raise InvalidCondition(f"invalid number '{text}' {at}")
        scope, dot, name = text.partition(".")
        if dot and scope not in ("vars", "matrix"):
            raise InvalidCondition(f"unknown context '{scope}' {at}: use vars.NAME or matrix.NAME")
        if dot and not _IDENT.fullmatch(name):
            raise InvalidCondition(f"invalid name '{text}' {at}: letters, digits and _ only")
        if dot:
            self.reads.add((scope, name))
            return Name(scope, name)
        if text in STATUS and self.peek().kind == "(":
            raise InvalidCondition(f"{text}() {at} cannot be compared")
        if text in STATUS:
            raise InvalidCondition(f"{text} {at} is a function: write {text}()")
        if self.peek().kind == "(":
            functions = "one of success(), failure(), always(), cancelled()"
            raise InvalidCondition(f"unknown function '{text}()' {at}: {functions}")
        raise InvalidCondition(f"unknown word '{text}' {at}: quote a string, as in '{text}'")


def parse(text: str) -> Condition:
    """The condition `text` parsed, or InvalidCondition saying what is wrong and where."""
    if not isinstance(text, str):
        raise InvalidCondition(f"a condition must be text, not {type(text).__name__}")
    return _parse(text)  # checked first: lru_cache would raise TypeError on unhashable input


@functools.lru_cache(maxsize=1024)  # the same few texts are evaluated for every job and step
def _parse(text: str) -> Condition:
    if len(text) > MAX_LENGTH:
        raise InvalidCondition(f"condition too long: {len(text)} characters, at most {MAX_LENGTH}")
    if "\0" in text:
        raise InvalidCondition(f"NUL character at column {text.index(chr(0)) + 1}")
    if not text.strip():
        raise InvalidCondition("the condition is empty")
    parser = _Parser(text)
    tree = parser.join(False)
    if (extra := parser.peek()).kind != "end":
        starts = extra.kind in ("word", "str", "(", "!")
        raise parser.fail(extra, ": join conditions with && or ||" if starts else "")
    return Condition(text.strip(), tree, frozenset(parser.reads), parser.calls_status)


parse.cache_info, parse.cache_clear = _parse.cache_info, _parse.cache_clear


def stored(text: str) -> Condition:
    """A job's or step's stored `if:` ("" when it has none: DEFAULT), parsed."""
    return parse(text or DEFAULT)


def evaluate(text: str, context: Context) -> bool:
    return parse(text).evaluate(context)
