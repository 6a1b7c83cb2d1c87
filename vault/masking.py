"""Masking secrets in a step's output: each occurrence of a value, of each line of a
multi-line value, of its base64 (standard and URL-safe, at the three alignments it can take
inside a longer encoding) and of its URL-encoded forms becomes `***`.

What is masked is what one RE2 pattern of all the forms, longest first, replaces: the
leftmost occurrence of any, the longest of those starting there, then on from its end. The
masker finds the same with Aho-Corasick automata (leftmost-longest) of at most GROUP forms
each, which the library scans with SIMD several times faster than RE2's DFA. Where the forms
need more than one automaton, the base64 ones (rarely printed) are only looked for, by a
piece of each starting at a rare byte, which the library skips to with memchr; an output
holding such a piece is masked with every form. RE2 masks itself where the automata cannot
tell (a form of one overlapping a form of another) or would be too many. All of it runs in
linear time, whatever the output."""

import base64
from collections.abc import Iterable
from itertools import combinations
from operator import itemgetter
from urllib.parse import quote, quote_plus

import re2
from ahocorasick_rs import BytesAhoCorasick, MatchKind

MASK = b"***"
MIN_FORM = 4  # a line of a value shorter than this is not masked on its own (`}` would be)
MIN_ENCODED = 6  # nor such a short piece of an encoding
# A longer form is masked as its pieces of this size, one after the other: RE2's automaton
# stays small (a 32 KiB value is 96 KiB URL-encoded), and so does what a line holds back.
PIECE = 1024
# Forms per automaton: up to 64, the library scans with its SIMD prefilter (Teddy); past that,
# about five times slower (measured with ahocorasick-rs 1.0).
GROUP = 64
# Each automaton scans the whole output: past about this many, RE2's one pass is as fast.
MAX_GROUPS = 10
# A base64 form is looked for by ANCHOR of its bytes, from one of three uppercase letters (the
# rarest in logs first): with at most three bytes its patterns start with, an automaton skips
# to them with memchr. The three that stand for most of the forms are taken, then three for
# the rest, and so on up to DETECTORS automata; a form none stands for is looked for whole.
ANCHOR = 8
RARE = b"QZJXVYKWU"
DETECTORS = 3

_START = itemgetter(1)


def forms(value: str) -> set[bytes]:
    """Every byte string that shows `value` in a log."""
    plain, encoded = _forms(value)
    return plain | encoded


def _forms(value: str) -> tuple[set[bytes], set[bytes]]:
    """The forms of `value` as printed, and as encoded in base64."""
    raw = value.encode()
    found = {raw}
    found |= {line.strip() for line in raw.splitlines() if len(line.strip()) >= MIN_FORM}
    for text in (quote(value, safe=""), quote_plus(value, safe="")):
        found.add(text.encode())
    encoded = set()
    for offset in range(3):
        encoding = base64.b64encode(b"\0" * offset + raw).rstrip(b"=")
        # The first characters also carry the bytes before the value; the last one may carry
        # the bytes after it: only those the value alone decides are kept.
        head = (0, 2, 3)[offset]
        tail = (offset + len(raw)) % 3  # 1 or 2: that many bytes in the last group
        piece = encoding[head : len(encoding) - (1 if tail else 0)]
        # `base64` wraps at 76 columns: each line of the value's own encoding is a form.
        lines = [piece[at : at + 76] for at in range(0, len(piece), 76)] if not offset else []
        for form in [piece, *lines]:
            if len(form) >= MIN_ENCODED:
                encoded |= {form, form.replace(b"+", b"-").replace(b"/", b"_")}
    return (
        {piece for form in found if form for piece in _pieces(form)},
        {piece for form in encoded for piece in _pieces(form)},
    )


def _pieces(form: bytes) -> list[bytes]:
    if len(form) <= PIECE:
        return [form]
    pieces = [form[at : at + PIECE] for at in range(0, len(form), PIECE)]
    if len(pieces[-1]) < MIN_FORM:  # too short alone: with the piece before it
        pieces[-2:] = [pieces[-2] + pieces[-1]]
    return pieces


class _Finder:
    """Finds what RE2's pattern of `forms` masks, with automata of at most GROUP forms each
    (their finds merged): as (form, start, end) in order; None where only RE2 can tell."""

    def __init__(self, forms: list[bytes]):
        self.automata = [
            BytesAhoCorasick(forms[at : at + GROUP], matchkind=MatchKind.LeftmostLongest)
            for at in range(0, len(forms), GROUP)
        ]

    def find(self, data: bytes) -> list[tuple[int, int, int]] | None:
        if len(self.automata) == 1:
            return self.automata[0].find_matches_as_indexes(data)
        found = [
            matches
            for automaton in self.automata
            if (matches := automaton.find_matches_as_indexes(data))
        ]
        if len(found) <= 1:
            return found[0] if found else []
        # Each automaton's finds are the pattern's over its own forms. Merged, they are the
        # pattern's over all of them, unless one starts inside one kept and ends past it: its
        # automaton went on from its end, and may have passed over a form starting before,
        # which the pattern would mask next.
        merged = [match for matches in found for match in matches]
        merged.sort(key=_START)
        kept, start, end = [], -1, 0
        for match in merged:
            if match[1] >= end:
                kept.append(match)
                start, end = match[1], match[2]
            elif match[2] > end:
                if match[1] != start:
                    return None
                kept[-1], end = match, match[2]  # a longer one from the same place
        return kept


def _detectors(encoded: list[bytes]) -> tuple[list[BytesAhoCorasick], list[bytes]]:
    """Automata finding a piece of each of the `encoded` forms (at most GROUP pieces an
    automaton), and the forms none stands for."""
    # The rare bytes a piece of each form may start with (early enough for ANCHOR bytes).
    holds = [set(form[: len(form) - ANCHOR + 1]) & set(RARE) for form in encoded]
    detectors, left = [], list(range(len(encoded)))
    while left and len(detectors) < DETECTORS:
        rare = max(
            (set(three) for three in combinations(RARE, 3)),
            key=lambda three: sum(not holds[i].isdisjoint(three) for i in left),
        )
        anchors, rest = set(), []
        for i in left:
            if holds[i].isdisjoint(rare) or len(anchors) == GROUP:
                rest.append(i)
            else:
                at = min(encoded[i].index(byte) for byte in holds[i] & rare)
                anchors.add(encoded[i][at : at + ANCHOR])
        if not anchors:
            break
        detectors.append(BytesAhoCorasick(sorted(anchors), matchkind=MatchKind.LeftmostLongest))
        left = rest
    return detectors, [encoded[i] for i in left]


class Masker:
    def __init__(self, values: Iterable[str] = ()):
        plain, encoded = set(), set()
        for value in values:
            value_plain, value_encoded = _forms(value)
            plain |= value_plain
            encoded |= value_encoded
        every = plain | encoded
        self.longest = max(map(len, every), default=0)
        # Longest first: where two forms start at the same place, the longer is masked.
        alternatives = sorted(every, key=lambda form: (-len(form), form))
        options = re2.Options()
        options.max_mem = 256 << 20  # room for many long secrets
        self._pattern = (
            re2.compile(b"|".join(re2.escape(form) for form in alternatives), options)
            if alternatives
            else None
        )
        plain, encoded = sorted(plain), sorted(encoded - plain)
        # The forms printed as the value is, first: an output showing only those has its
        # occurrences from as few automata as can be.
        fits = len(plain) + len(encoded) <= GROUP * MAX_GROUPS
        self._all = _Finder(plain + encoded) if fits and every else None
        # Past one automaton, the base64 forms are only looked for (detectors); an output
        # holding none is masked with the others (usual).
        self._usual, self._detectors = None, []
        if len(plain) + len(encoded) > GROUP:
            detectors, left = _detectors(encoded)
            if detectors and len(plain) + len(left) <= GROUP * MAX_GROUPS:
                self._usual, self._detectors = _Finder(plain + left), detectors

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mask(self, data: bytes) -> bytes:
        matches = self._finds(data)
        if matches is None:
            return self._pattern.sub(MASK, data) if self._pattern else data
        if not matches:
            return data
        view, pieces, at = memoryview(data), [], 0  # views: each piece copied once, by join
        for _, start, end in matches:
            pieces.append(view[at:start])
            at = end
        pieces.append(view[at:])
        return MASK.join(pieces)

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where the secrets are in `data`."""
        matches = self._finds(data)
        if matches is None:
            return [m.span() for m in self._pattern.finditer(data)] if self._pattern else []
        return [(start, end) for _, start, end in matches]

    def holds_secret(self, data: bytes) -> bool:
        if self._all:
            return any(automaton.find_matches_as_indexes(data) for automaton in self._all.automata)
        return bool(self._pattern and self._pattern.search(data))

    def _finds(self, data: bytes) -> list[tuple[int, int, int]] | None:
        """What the pattern masks in `data`, as (form, start, end) in order; None where it
        must tell itself."""
        if self._usual and not any(
            detector.find_matches_as_indexes(data) for detector in self._detectors
        ):
            return self._usual.find(data)  # no base64 form: what the others mask
        return self._all.find(data) if self._all else None
