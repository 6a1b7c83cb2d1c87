"""Restart the broker while builds run and while builds wait. Redis keeps nothing on disk, so
every message it held is lost: agents and the controller reconnect, and the reconcile sweep
re-drives what the lost messages would have done (builds to advance, jobs to send again).
(tests/faults/test_rabbitmq.py runs the same with RabbitMQ.)"""

from celery import Celery

from tests.faults.stack import RECORD, assert_settled, holding, wait_blocked_by
from tests.support import wait_until

# Two stages, so advance messages are in flight too; the sleeps keep steps running across
# the restart. At most two of these builds run at once; the others wait in the policy's queue.
PIPELINE = f"""
concurrency: broker-restart
variables: {{RUNS: ""}}
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
    ids = restart_broker_while_builds_run(stack, broker, runs)
    # The queued jobs' messages were lost with Redis: the sweep sent them again.
    resent = "SELECT count(*) FROM builds_jobrun WHERE resent_at IS NOT NULL AND build_id = ANY(%s)"
    assert stack.sql(resent, ids)[0][0] > 0


def restart_broker_while_builds_run(stack, broker, runs, policy="broker-restart") -> list[int]:
    """Builds running, jobs waiting in the broker, builds waiting in their group's queue, and
    one more triggered while the broker is down: all of them end SUCCEEDED, each step once."""
    stack.policy(policy, max_running=2, queue_length=20)
    pipeline = stack.pipeline(policy, PIPELINE.replace("broker-restart", policy))
    ids = [stack.trigger(pipeline, RUNS=str(runs))["id"] for _ in range(6)]

    def count(table: str, status: str) -> int:
        return stack.sql(f"SELECT count(*) FROM {table} WHERE status = %s", status)[0][0]

    def messages_in_flight():  # jobs running, jobs waiting in the broker, builds waiting
        return all(
            count(table, status)
            for table, status in [("builds_jobrun", "RUNNING"), ("builds_jobrun", "QUEUED"),
                                  ("builds_build", "QUEUED")]
        )  # fmt: skip

    wait_until(messages_in_flight, timeout=30, message="jobs running and waiting")
    ended_before = count("builds_jobrun", "SUCCEEDED")
    broker.stop()
    # The outage lasts until a job has ended: its advance message could not be sent.
    wait_until(lambda: count("builds_jobrun", "SUCCEEDED") > ended_before, timeout=30)
    # A trigger meanwhile is taken (PostgreSQL holds it); its messages wait for the sweep.
    ids.append(stack.trigger(pipeline, RUNS=str(runs))["id"])
    broker.start()

    statuses = stack.wait_final(ids, timeout=120)
    assert set(statuses.values()) == {"SUCCEEDED"}, statuses
    stack.check_alive()  # every process rode the outage out: none exited
    assert_settled(stack, runs)
    assert len(runs.read_text().splitlines()) == 3 * len(ids)
    return ids


def test_workers_ride_out_redis_restarting_under_their_running_tasks(stack, broker, runs):
    """The controller runs advance_build (it waits on the build's row lock, held here, so its
    message stays unacknowledged) while Redis restarts, and acknowledges it after: the worker
    goes on. (With kombu 5.7's own Redis transport it stops: see ciproject.broker.)"""
    pipeline = stack.pipeline("under-a-task", PIPELINE.replace("concurrency: broker-restart", ""))
    build = stack.trigger(pipeline, RUNS=str(runs))["id"]
    lock_build = "SELECT id FROM builds_build WHERE id = %s FOR UPDATE"
    with holding(stack, lock_build, build) as locker:
        sender = Celery(broker=broker.url)
        sender.send_task("builds.tasks.advance_build", args=(build,), queue="controller")
        wait_blocked_by(stack, locker)  # the task runs, its message unacknowledged
        broker.stop()
        broker.start()
        stack.wait_ready(["controller", *stack.AGENTS])  # reconnected, the task still held
    assert stack.wait_final([build], timeout=60) == {build: "SUCCEEDED"}
    stack.wait_ready(["controller", *stack.AGENTS])  # and alive after acknowledging it
    assert_settled(stack, runs)
