"""Masking figures (`make bench`): a step printing 100 MB of log lines with 20 secrets to
mask (each twentieth line holds one), against the same step unmasked (the reference, same
run). Target: masked at most 20% slower.

One run of each varies by tens of percent (the runner notices the step's exit up to 50 ms
late, and the machine may be busy): they alternate, ROUNDS of each, and the medians are
compared (the best of each too)."""

import secrets
import statistics
import time

from agents.process.runner import StepOutput, run_step, step_environment
from vault.masking import Masker

SIZE = 100 * 1024 * 1024
VALUES = [secrets.token_urlsafe(24) for _ in range(20)]
ROUNDS = 5


def timed(tmp_path, masker: Masker) -> tuple[float, str]:
    # 100-byte lines; every twentieth shows one of the secrets.
    script = tmp_path / "print.py"
    script.write_text(
        "import os, sys\n"
        "values = os.environ['VALUES'].split()\n"
        "filler = 'x' * 99 + '\\n'\n"
        "block = ''.join(filler if n % 20 else f'token {values[n // 20 % 20]} used'.ljust(99)"
        " + '\\n' for n in range(4000))\n"
        f"for _ in range({SIZE} // len(block)): sys.stdout.write(block)\n"
    )
    output = StepOutput(SIZE * 2, masker)
    started = time.perf_counter()
    outcome = run_step(
        f"python3 {script}", cwd=str(tmp_path), timeout=600, output=output, grace=5,
        env=step_environment({"VALUES": " ".join(VALUES)}, {}),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert outcome.exit_code == 0
    return seconds, output.take()


def test_masking_overhead(tmp_path):
    bare, masked = [], []
    for _ in range(ROUNDS):
        seconds, plain = timed(tmp_path, Masker())
        bare.append(seconds)
        assert VALUES[0] in plain
        del plain
        seconds, log = timed(tmp_path, Masker(VALUES))
        masked.append(seconds)
        assert not any(value in log for value in VALUES)
        assert log.count("***") == SIZE // (4000 * 100) * 200  # each one, in every block
        del log
    median, reference = statistics.median(masked), statistics.median(bare)
    print(
        f"\nmasking: 100 MB step log with 20 secrets: {median:.2f} s masked,"
        f" {reference:.2f} s unmasked (reference), overhead {100 * (median / reference - 1):.0f}%"
        f" (target <= 20%); medians of {ROUNDS} runs each, best {min(masked):.2f} s against"
        f" {min(bare):.2f} s ({100 * (min(masked) / min(bare) - 1):.0f}%)"
    )
