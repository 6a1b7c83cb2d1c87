"""Masking: a secret comes out of a step's log as *** however the step prints it: plainly,
a few bytes at a time with pauses between the pipe's reads, inside a longer line, base64
(inside a longer encoding too), URL-encoded, on two lines, at the cut of an overlong line;
and a set-variable line holding one is refused. The steps are real processes."""

import base64
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from agents.process.runner import MAX_LINE, StepOutput, run_step, step_environment
from vault.masking import MASK, Masker

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
