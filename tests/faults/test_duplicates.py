"""Redelivered and duplicated messages: Redis redelivers a job message whose step outlives
the visibility timeout (acks_late), and this test sends every message of a build again on
purpose, early and late. The attempt fencing makes them all harmless: each step runs once,
in stage order, and the build ends as it would have."""

import json

from celery import Celery

from tests.faults.stack import RECORD, assert_settled
from tests.support import wait_until

GATE = 'until [ -e "$RUNS.go" ]; do sleep 0.1; done'  # a runs until the test lets it end
PIPELINE = f"""
variables: {{RUNS: ""}}
stages:
  - name: first
    jobs:
      - {{id: a, runs-on: default, steps: [{{run: '{RECORD.format(name="a")}; {GATE}'}}]}}
  - name: second
    jobs:
      - {{id: b, runs-on: default, steps: [{{run: '{RECORD.format(name="b")}'}}]}}
"""
# A job message is back in the queue 2 s after an agent took it, while its step still runs.
REDELIVERING = {
    "CELERY_VISIBILITY_TIMEOUT": "2",
    "CELERY_TRANSPORT_OPTIONS": json.dumps(
        {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    ),
}


def ignored(stack, job_id: int) -> int:
    """How many times an agent logged a message for this job as stale or duplicate."""
    line = f"job {job_id} attempt 1: stale, duplicate or cancelled; ignored"
    return sum((stack.log_dir / f"{agent}.log").read_text().count(line) for agent in stack.AGENTS)


def test_redelivered_and_duplicated_messages_are_harmless(stack, broker, runs):
    for name, labels in stack.AGENTS.items():
        stack.stop(name)
        stack.start_agent(name, labels, env=REDELIVERING)
    try:
        stack.wait_ready(list(stack.AGENTS))
        pipeline = stack.pipeline("duplicates", PIPELINE)
        build = stack.trigger(pipeline, RUNS=str(runs))["id"]
        jobs = dict(stack.sql("SELECT key, id FROM builds_jobrun WHERE build_id = %s", build))
        wait_until(lambda: runs.read_text(), timeout=30, message="job a to start")

        sender = Celery(broker=broker.url)
        for _ in range(3):  # `b` is still PENDING: its messages come before its stage
            for job_id in jobs.values():
                sender.send_task("agents.tasks.run_job", args=(job_id, 1), queue="jobs.default")
            sender.send_task("builds.tasks.advance_build", args=(build,), queue="controller")

        # While a runs: b's early messages are refused (it is PENDING), and a's own comes back.
        wait_until(
            lambda: ignored(stack, jobs["b"]) >= 3 and ignored(stack, jobs["a"]) > 3,
            timeout=30,
            message="the duplicates and a redelivery to be ignored",
        )
        runs.with_name(runs.name + ".go").touch()
        assert stack.wait_final([build], timeout=60) == {build: "SUCCEEDED"}
        assert_settled(stack, runs)
        assert [line.split("/")[2] for line in runs.read_text().splitlines()] == ["a", "b"]
        [(a_ended, b_started)] = stack.sql(
            "SELECT a.finished_at, b.started_at FROM builds_jobrun a, builds_jobrun b"
            " WHERE a.id = %s AND b.id = %s", jobs["a"], jobs["b"]
        )  # fmt: skip
        assert b_started >= a_ended  # the second stage waited for the first
    finally:
        for name, labels in stack.AGENTS.items():
            stack.stop(name)
            stack.start_agent(name, labels)
        stack.wait_ready(list(stack.AGENTS))
