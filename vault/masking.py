"""Masking secrets in a step's output: each occurrence of a value, of each line of a
multi-line value, of its base64 (standard and URL-safe, at the three alignments it can take
inside a longer encoding) and of its URL-encoded forms becomes `***`. One RE2 pattern of
them all: matched in linear time, whatever the output and however many secrets."""

import base64
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

import re2

MASK = b"***"
MIN_FORM = 4  # a line of a value shorter than this is not masked on its own (`}` would be)
MIN_ENCODED = 6  # nor such a short piece of an encoding
# A longer form is masked as its pieces of this size, one after the other: RE2's automaton
# stays small (a 32 KiB value is 96 KiB URL-encoded), and so does what a line holds back.
PIECE = 1024


def forms(value: str) -> set[bytes]:
    """Every byte string that shows `value` in a log."""
    raw = value.encode()
    found = {raw}
    found |= {line.strip() for line in raw.splitlines() if len(line.strip()) >= MIN_FORM}
    for text in (quote(value, safe=""), quote_plus(value, safe="")):
        found.add(text.encode())
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).rstrip(b"=")
        # The first characters also carry the bytes before the value; the last one may carry
        # the bytes after it: only those the value alone decides are kept.
        head = (0, 2, 3)[offset]
        tail = (offset + len(raw)) % 3  # 1 or 2: that many bytes in the last group
        piece = encoded[head : len(encoded) - (1 if tail else 0)]
        # `base64` wraps at 76 columns: each line of the value's own encoding is a form.
        lines = [piece[at : at + 76] for at in range(0, len(piece), 76)] if not offset else []
        for form in [piece, *lines]:
            if len(form) >= MIN_ENCODED:
                found |= {form, form.replace(b"+", b"-").replace(b"/", b"_")}
    return {piece for form in found if form for piece in _pieces(form)}


def _pieces(form: bytes) -> list[bytes]:
    if len(form) <= PIECE:
        return [form]
    pieces = [form[at : at + PIECE] for at in range(0, len(form), PIECE)]
    if len(pieces[-1]) < MIN_FORM:  # too short alone: with the piece before it
        pieces[-2:] = [pieces[-2] + pieces[-1]]
    return pieces


class Masker:
    def __init__(self, values: Iterable[str] = ()):
        every = set().union(*(forms(value) for value in values))
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

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mask(self, data: bytes) -> bytes:
        return self._pattern.sub(MASK, data) if self._pattern else data

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Where the secrets are in `data`."""
        return [match.span() for match in self._pattern.finditer(data)] if self._pattern else []

    def holds_secret(self, data: bytes) -> bool:
        return bool(self._pattern and self._pattern.search(data))
