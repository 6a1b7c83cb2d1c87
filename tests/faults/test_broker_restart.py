"""Restart Redis, the broker, while builds run and while builds wait: it keeps nothing on disk,
so every message it held is lost. Agents and the controller reconnect, and the reconcile
sweep re-drives what the lost messages would have: builds to advance, jobs to send again."""

from tests.faults.stack import RECORD, assert_settled
from tests.support import wait_until

# Two stages, so advance messages are in flight too; the sleeps keep steps running across
# the restart. At most two of these builds run at once; the others wait in the policy's queue.
PIPELINE = f"""
concurrency: broker-restart
stages:
  - name: build
    jobs:
      - {{id: a, runs-on: default, steps: [{{run: '{RECORD.format(name="a")}; sleep 2'}}]}}
      - {{id: b, runs-on: default, steps: [{{run: '{RECORD.format(name="b")}; sleep 1'}}]}}
  - name: test
    jobs:
      - {{id: c, runs-on: default, steps: [{{run: '{RECORD.format(name="c")}; sleep 1'}}]}}
"""


def test_redis_restart_loses_messages_and_the_sweep_recovers(stack, broker, runs):
    stack.policy("broker-restart", max_running=2, queue_length=20)
    pipeline = stack.pipeline("broker-restart", PIPELINE)
    builds = [stack.trigger(pipeline, RUNS=str(runs)) for _ in range(6)]
    ids = [b["id"] for b in builds]

    def count(table: str, status: str) -> int:
        query = f"SELECT count(*) FROM {table} WHERE status = %s"
        return stack.sql(query, status)[0][0]

    def messages_in_flight():  # jobs running, jobs waiting in the broker, builds waiting
        return all(
            count(table, status)
            for table, status in [("builds_jobrun", "RUNNING"), ("builds_jobrun", "QUEUED"),
                                  ("builds_build", "QUEUED")]
        )  # fmt: skip

    wait_until(messages_in_flight, timeout=30, message="jobs running and waiting")
    ended_before = count("builds_jobrun", "SUCCEEDED")
    broker.kill()
    # The outage lasts until a job has ended: its advance message could not be sent.
    wait_until(lambda: count("builds_jobrun", "SUCCEEDED") > ended_before, timeout=30)
    broker.start()

    statuses = stack.wait_final(ids, timeout=120)
    assert set(statuses.values()) == {"SUCCEEDED"}, statuses
    assert_settled(stack, runs)
    assert len(runs.read_text().splitlines()) == 3 * len(ids)
    # The queued jobs' messages were lost with Redis: the sweep sent them again.
    assert stack.sql("SELECT count(*) FROM builds_jobrun WHERE resent_at IS NOT NULL")[0][0] > 0
