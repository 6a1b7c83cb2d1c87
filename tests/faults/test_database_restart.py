"""Crash and restart PostgreSQL while builds run. Every process reconnects; a step's result
that could not be written while it was down is written once it is back, not dropped."""

import re
import signal
import time

from tests.faults.stack import RECORD, assert_settled
from tests.support import wait_until


def step(name: str) -> str:
    """Records its start, runs a second, then records its end in $RUNS.ended."""
    return f"{{run: '{RECORD.format(name=name)}; sleep 1; echo {name} >> \"$RUNS.ended\"'}}"


# The line the controller logs when a lost-agent sweep has run through.
SWEPT = re.compile(r"Task agents\.tasks\.mark_lost_agents\[[^\]]+\] succeeded")

PIPELINE = f"""
variables: {{RUNS: ""}}
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


def test_the_lost_agent_sweep_does_not_count_the_outage(stack, postgres):
    """PostgreSQL is down for longer than the lost-agent timeout. The first sweeps after its
    restart must not take for lost an agent that has had no chance to beat since: here one
    frozen across the outage and a little after it (by the database's clock its heartbeat
    is older than the timeout, but the database itself was away)."""
    agent = "fault-1"
    stack.procs[agent].send_signal(signal.SIGSTOP)
    try:
        postgres.stop("immediate")
        time.sleep(9)  # the outage's length: longer than AGENT_OFFLINE_AFTER_SECONDS (8)
        controller_log = stack.log_dir / "controller.log"
        seen = len(SWEPT.findall(controller_log.read_text()))
        postgres.start()
        # Two sweeps after the restart, so one ran after the controller reconnected.
        wait_until(lambda: len(SWEPT.findall(controller_log.read_text())) >= seen + 2, timeout=30,
                   message="the lost-agent sweep to run after the restart")  # fmt: skip
        assert stack.sql("SELECT status FROM agents_agent WHERE name = %s", agent) == [("online",)]
    finally:
        stack.procs[agent].send_signal(signal.SIGCONT)
    assert_settled(stack)
