"""Crash and restart PostgreSQL while builds run. Every process reconnects; a step's result
that could not be written while it was down is written once it is back, not dropped."""

from tests.faults.stack import RECORD, assert_settled
from tests.support import wait_until


def step(name: str) -> str:
    """Records its start, runs a second, then records its end in $RUNS.ended."""
    return f"{{run: '{RECORD.format(name=name)}; sleep 1; echo {name} >> \"$RUNS.ended\"'}}"


PIPELINE = f"""
stages:
  - name: build
    jobs:
      - {{id: a, runs-on: default, steps: [{step("a1")}, {step("a2")}, {step("a3")}]}}
  - name: test
    jobs:
      - {{id: b, runs-on: default, steps: [{step("b1")}]}}
"""


def test_postgres_crash_while_steps_run(stack, postgres, runs):
    pipeline = stack.pipeline("database-restart", PIPELINE)
    ids = [stack.trigger(pipeline, RUNS=str(runs))["id"] for _ in range(3)]
    ended = runs.with_name(runs.name + ".ended")

    def lines(path):
        return len(path.read_text().splitlines()) if path.exists() else 0

    wait_until(lambda: lines(runs) >= 2, timeout=30, message="steps to start")
    postgres.stop("immediate")  # a crash: every session is cut mid-transaction
    ended_before = lines(ended)
    # Down until a step has ended: its result has nowhere to go yet.
    wait_until(lambda: lines(ended) > ended_before, timeout=30, message="a step to end")
    # The API says so, with a code, and takes nothing: the client knows to retry.
    status, body = stack.api("POST", f"/api/pipelines/{pipeline}/builds/", {"variables": {}})
    assert (status, body["code"]) == (503, "DATABASE_UNAVAILABLE")
    postgres.start()

    statuses = stack.wait_final(ids, timeout=120)
    assert set(statuses.values()) == {"SUCCEEDED"}, statuses
    assert_settled(stack, runs)
    assert lines(runs) == 4 * len(ids)
    assert stack.sql("SELECT count(*) FROM builds_build WHERE pipeline_id = %s", pipeline) == [
        (len(ids),)
    ]
