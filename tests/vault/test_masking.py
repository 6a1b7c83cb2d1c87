"""Masking: a secret comes out of a step's log as *** however the step prints it: plainly,
a few bytes at a time with pauses between the pipe's reads, inside a longer line, base64
(inside a longer encoding too), URL-encoded, on two lines, at the cut of an overlong line;
and a set-variable line holding one is refused. The steps are real processes. Then the masker
against its definition, with random values and texts (and a step's output read in random
pieces), whichever way it finds them."""

import base64
from itertools import pairwise
from unittest.mock import patch
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.process import runner
from agents.process.runner import MAX_LINE, StepOutput, run_step, step_environment
from vault import masking
from vault.masking import MASK, Masker, forms

SECRET = "hunter2/Pa$$word+42"
TWO_LINES = "first-line-of-key\nsecond-line-of-key"


def run_masked(command: str, tmp_path, secrets: dict[str, str]):
    output = StepOutput(1 << 22, Masker(secrets.values()))
    outcome = run_step(
        command, cwd=str(tmp_path), env=step_environment(secrets, {"CI": "true"}),
        timeout=30, output=output, grace=2.0,
    )  # fmt: skip
    assert outcome.exit_code == 0
    return output.take(), output


def test_every_way_a_step_prints_a_secret_is_masked(tmp_path):
    command = "\n".join([
        'echo "plain: $S"',
        'echo "inside:token=${S}&next=1"',
        # A few bytes at a time, pausing between the reads of the pipe.
        'for i in $(seq 0 3 ${#S}); do printf %s "${S:$i:3}"; sleep 0.05; done; echo',
        'printf %s "$S" | base64',
        'printf "xy%s-and-more" "$S" | base64 -w0; echo',  # inside a longer encoding
        'printf "%s" "$S" | basenc --base64url; echo',
        f"echo 'url: {quote(SECRET, safe='')}'",
        'echo "key: $K"',
        'echo "one line of it: $(printf %s "$K" | tail -1)"',
        'echo done',
    ])  # fmt: skip
    log, _ = run_masked(command, tmp_path, {"S": SECRET, "K": TWO_LINES})
    assert SECRET not in log
    for leak in ("hunter2", "Pa$$word", "first-line", "second-line"):
        assert leak not in log, log
    for form in (base64.b64encode(SECRET.encode()).decode().rstrip("="), quote(SECRET, safe="")):
        assert form[2:-2] not in log
    assert "plain: ***\n" in log
    assert "inside:token=***&next=1\n" in log
    assert "key: ***\n" in log  # both lines: the whole value, or each of its lines
    assert "one line of it: ***\n" in log
    assert log.endswith("done\n")


def test_a_secret_at_the_cut_of_an_overlong_line_is_masked(tmp_path):
    # No newline for longer than MAX_LINE: the line goes to the log in pieces, never one cut
    # inside the secret.
    for before in (MAX_LINE - 5, MAX_LINE - len(SECRET) + 3, MAX_LINE + 1):
        command = (
            f'head -c {before} /dev/zero | tr "\\0" a; printf %s "$S";'
            ' head -c 70000 /dev/zero | tr "\\0" b'
        )
        log, _ = run_masked(command, tmp_path, {"S": SECRET})
        assert log == "a" * before + "***" + "b" * 70000


def test_a_set_variable_holding_a_secret_is_refused_with_a_warning(tmp_path):
    command = 'echo "::set-variable name=COPY::x-$S"; echo "::set-variable name=FINE::ok"'
    log, output = run_masked(command, tmp_path, {"S": SECRET})
    assert output.variables == {"FINE": "ok"}
    assert output.warnings == [
        "set-variable ignored: COPY: the line holds a secret, which a variable may not"
    ]
    assert SECRET not in log


def test_without_secrets_nothing_is_masked(tmp_path):
    log, _ = run_masked('echo "hunter2 ***"', tmp_path, {})
    assert log == "hunter2 ***\n"


SECRETS = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=8, max_size=40)


@given(SECRETS, st.binary(max_size=5), st.binary(max_size=5), st.booleans())
def test_base64_of_a_secret_inside_any_encoding_is_found(secret, before, after, urlsafe):
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    masker = Masker([secret])
    assert masker.holds_secret(encode(before + secret.encode() + after))


@given(SECRETS, st.binary(max_size=20), st.binary(max_size=20))
def test_a_masked_text_never_shows_the_secret(secret, before, after):
    masked = Masker([secret]).mask(before + secret.encode() + after)
    assert secret.encode() not in masked
    assert MASK in masked


def test_a_long_secret_in_base64_wrapped_at_76_columns_is_masked(tmp_path):
    long = "L0ng-" + "k3y" * 40  # 125 bytes: three lines of `base64` output
    log, _ = run_masked('printf %s "$S" | base64; base64 <<<"$S"', tmp_path, {"S": long})
    for line in base64.encodebytes(long.encode()).decode().splitlines():
        assert line[:-4] not in log
    assert log.count("***") >= 6


def test_a_secret_longer_than_a_line_is_masked_whole(tmp_path):
    # Its URL-encoded form (3 bytes a character) is longer than MAX_LINE: masked piece by
    # piece, never cut inside one.
    huge = "%" * 30000
    log, _ = run_masked(
        "python3 -c \"import os, sys, urllib.parse; s = urllib.parse.quote(os.environ['S'])\n"
        'for i in range(0, len(s), 1000): sys.stdout.write(s[i:i + 1000]); sys.stdout.flush()"',
        tmp_path,
        {"S": huge},
    )
    assert set(log) == {"*"}


# What a masker masks, written out plainly: the leftmost occurrence of any form of any value,
# the longest of those starting there, then on from its end. The masker finds them with
# Aho-Corasick automata (merged when there are several; past one, the base64 forms only looked
# for by a piece) or with its RE2 pattern: each way must give this, whatever the values and
# however they overlap.
def reference_mask(values, data: bytes) -> bytes:
    every = set().union(*(forms(value) for value in values))
    out, at = [], 0
    while at < len(data):
        found = max((form for form in every if data.startswith(form, at)), key=len, default=b"")
        out.append(MASK if found else data[at : at + 1])
        at += len(found) or 1
    return b"".join(out)


def text_of(data, values, alphabet: bytes) -> bytes:
    """Forms of the values, whole or in part, run together or between random bytes."""
    every = sorted(set().union(*(forms(value) for value in values)))
    part = st.one_of(
        st.sampled_from(every),
        st.tuples(st.sampled_from(every), st.integers(0, 99), st.integers(0, 99)).map(
            lambda cut: cut[0][min(cut[1:]) : max(cut[1:])]
        ),
        st.binary(max_size=4).map(lambda raw: bytes(alphabet[b % len(alphabet)] for b in raw)),
    )
    return b"".join(data.draw(st.lists(part, max_size=12)))


# Values that share pieces, so that their forms overlap in every way.
OVERLAPPING = st.text(st.sampled_from("ab"), min_size=4, max_size=8) | st.text(
    st.sampled_from("ab+/%*- \n"), min_size=4, max_size=10
)


@pytest.mark.parametrize(("group", "max_groups"), [(64, 6), (2, 6), (1, 1000)])
@given(values=st.lists(OVERLAPPING, min_size=1, max_size=5), data=st.data())
def test_masking_is_its_definition(group, max_groups, values, data):
    # Few forms an automaton: several automata, their finds merged (or handed to RE2 where
    # they overlap), base64 forms looked for by a piece; and RE2 alone past MAX_GROUPS.
    with patch.object(masking, "GROUP", group), patch.object(masking, "MAX_GROUPS", max_groups):
        masker = Masker(values)
    text = text_of(data, values, b"ab+/%*- \n=")
    expected = reference_mask(values, text)
    assert masker.mask(text) == expected
    pieces, at = [], 0
    for start, end in masker.spans(text):
        pieces.append(text[at:start])
        at = end
    assert MASK.join([*pieces, text[at:]]) == expected
    every = set().union(*(forms(value) for value in values))
    assert masker.holds_secret(text) == any(form in text for form in every)


LINE_SECRETS = st.lists(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=4, max_size=12),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("group", [64, 2])
@given(values=LINE_SECRETS, data=st.data())
def test_an_output_read_in_any_pieces_is_masked_as_a_whole(group, values, data):
    # However the pipe's reads cut it (inside a value, or an overlong line cut before its
    # newline: MAX_LINE is made short), the log is the whole text masked at once.
    text = text_of(data, values, b"ab+/%*- \n\n\n")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    with patch.object(runner, "MAX_LINE", 16), patch.object(masking, "GROUP", group):
        output = StepOutput(1 << 20, Masker(values))
        for start, end in pairwise([0, *cuts, len(text)]):
            output.feed(text[start:end])
        output.close()
    log = output.take()
    assert log == reference_mask(values, text).decode()
    if not any("*" in value for value in values):  # else *** beside a value may spell one
        for form in set().union(*(forms(value) for value in values)):
            assert form.decode() not in log


def test_a_form_one_automaton_passed_over_is_masked_all_the_same():
    # One automaton a form: `abab` finds itself at 2 and goes on from 6; but `zzab` is masked
    # first, and the pattern masks `abab` from 4 next. So it does here.
    with patch.object(masking, "GROUP", 1), patch.object(masking, "MAX_GROUPS", 1000):
        masker = Masker(["zzab", "abab"])
    assert len(masker._all.automata) > 1
    assert masker.spans(b"zzababab") == [(0, 4), (4, 8)]
    assert masker.mask(b"zzababab") == b"******"
    assert Masker(["zzab", "abab"]).mask(b"zzababab") == b"******"


def test_with_many_secrets_each_form_of_each_is_masked():
    # Twenty secrets: more forms than one automaton holds, so the base64 ones are looked for
    # by a piece; an output holding one is masked with every form, and one without as well.
    values = [f"Value-{n:02}-of-a-secret/{'x' * n}" for n in range(20)]
    masker = Masker(values)
    assert masker._detectors
    shown = [
        b"plain " + values[3].encode(),
        b"base64 " + base64.b64encode(b"ab" + values[7].encode()),
        b"url-safe " + base64.urlsafe_b64encode(values[8].encode()),
        b"url " + quote(values[9], safe="").encode(),
    ]
    for text in [b"\n".join(shown), b"\n".join(shown[:1] + shown[3:]), b"nothing"]:
        assert masker.mask(text) == reference_mask(values, text)
    masked = masker.mask(b"\n".join(shown))
    assert masked.count(b"***") == 4
    assert not any(value.encode() in masked for value in values)
