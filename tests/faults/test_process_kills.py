"""SIGKILL each kind of process at its worst moment: an agent mid-step, the controller
mid-advance, web mid-trigger. Every build still ends, nothing runs twice, nothing stays held."""

import threading

import pytest

from tests.faults.stack import RECORD, assert_settled, holding, wait_blocked_by
from tests.support import process_alive, wait_until

# `j` leases its agent to the build: `then` runs there after it, in its workspace.
SLEEPER = f"""
variables: {{RUNS: "", SLEEP: "0"}}
stages:
  - name: first
    jobs:
      - id: j
        runs-on: default
        steps:
          - run: '{RECORD.format(name="sleep")}; echo $$ > "$RUNS.$CI_BUILD_ID.pid"; sleep "$SLEEP"'
  - name: second
    jobs:
      - {{id: then, reuse: j, steps: [{{run: '{RECORD.format(name="then")}'}}]}}
"""

TWO_STAGES = f"""
variables: {{RUNS: ""}}
stages:
  - name: first
    jobs:
      - {{id: a, runs-on: default, steps: [{{run: '{RECORD.format(name="a")}'}}]}}
  - name: second
    jobs:
      - {{id: b, runs-on: default, steps: [{{run: '{RECORD.format(name="b")}'}}]}}
"""


def test_agent_killed_mid_step(stack, runs):
    kill_agent_mid_step(stack, runs)


def kill_agent_mid_step(stack, runs) -> None:
    """The job on the killed agent ends FAILED naming it once it is found lost, and its lease
    on the agent is dropped; the other agent's build is untouched; the restarted agent kills
    the step its killed run left behind and is online again."""
    pipeline = stack.pipeline("agent-kill", SLEEPER)
    doomed = stack.trigger(pipeline, RUNS=str(runs), SLEEP="300")
    pid_file = runs.with_name(f"{runs.name}.{doomed['id']}.pid")
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=30,
               message="the long step to start")  # fmt: skip
    step_pid = int(pid_file.read_text())
    [(agent,)] = stack.sql(
        "SELECT agent FROM builds_jobrun WHERE build_id = %s AND key = 'j'", doomed["id"]
    )
    leased = stack.sql(
        "SELECT a.name FROM agents_agentlease l JOIN agents_agent a ON a.id = l.agent_id"
        " WHERE l.build_id = %s", doomed["id"]
    )  # fmt: skip
    assert leased == [(agent,)]
    bystander = stack.trigger(pipeline, RUNS=str(runs), SLEEP="3")

    stack.kill(agent)

    statuses = stack.wait_final([doomed["id"], bystander["id"]], timeout=60)
    assert statuses == {doomed["id"]: "FAILED", bystander["id"]: "SUCCEEDED"}
    [(reason,)] = stack.sql(
        "SELECT reason FROM builds_jobrun WHERE build_id = %s AND key = 'j'", doomed["id"]
    )
    assert agent in reason
    assert process_alive(step_pid)  # a step leads its own process group: the kill did not reach it

    stack.restart(agent)
    wait_until(
        lambda: not process_alive(step_pid), timeout=10, message="the orphaned step to be killed"
    )
    assert stack.sql("SELECT status FROM agents_agent WHERE name = %s", agent) == [("online",)]
    again = [stack.trigger(pipeline, RUNS=str(runs), SLEEP="0") for _ in range(4)]
    assert set(stack.wait_final(b["id"] for b in again).values()) == {"SUCCEEDED"}
    assert_settled(stack, runs)


def test_controller_killed_mid_advance(stack, runs):
    """The controller dies inside advance_build's transaction (it holds the build's row lock
    and waits to queue the second stage): the transaction is rolled back, and once a
    controller is back the reconcile sweep queues the stage; the build ends SUCCEEDED."""
    pipeline = stack.pipeline("controller-kill", TWO_STAGES)
    build = stack.trigger(pipeline, RUNS=str(runs))
    second = "SELECT id FROM builds_jobrun WHERE build_id = %s AND key = 'b' FOR UPDATE"
    with holding(stack, second, build["id"]) as locker:
        wait_blocked_by(stack, locker)  # the first stage ended; advance_build waits on us
        stack.kill("controller")
    stack.restart("controller")

    assert stack.wait_final([build["id"]], timeout=30) == {build["id"]: "SUCCEEDED"}
    assert_settled(stack, runs)
    assert len(runs.read_text().splitlines()) == 2


def test_web_killed_mid_trigger(stack, runs):
    """web dies inside its trigger transaction, after it took the next number and wrote the
    build, while it writes the jobs: all of it is rolled back, and the client gets an error
    rather than a build. It sends the trigger again with its Idempotency-Key, and again: one
    build, with the next number. No number is given twice."""
    pipeline = stack.pipeline("web-kill", TWO_STAGES)
    first = stack.trigger(pipeline, RUNS=str(runs))
    stack.wait_final([first["id"]])  # so that only the trigger writes jobs now
    answer = {}

    def trigger():
        return stack.api(
            "POST",
            f"/api/pipelines/{pipeline}/builds/",
            {"variables": {"RUNS": str(runs)}},
            headers={"Idempotency-Key": "web-kill-1"},
        )

    def cut_short():
        try:
            answer["response"] = trigger()
        except OSError as exc:  # the connection was cut: the client does not know
            answer["error"] = exc

    with holding(stack, "LOCK TABLE builds_jobrun IN SHARE MODE") as locker:
        caller = threading.Thread(target=cut_short)
        caller.start()
        wait_blocked_by(stack, locker, 'INSERT INTO "builds_jobrun"')
        stack.kill("web")
    caller.join(timeout=15)
    assert "error" in answer, answer
    number = "SELECT last_build_number FROM builds_pipeline WHERE id = %s"
    assert stack.sql(number, pipeline) == [(first["number"],)]  # the number is free again
    stack.restart("web")

    (made, after), (replayed, again) = trigger(), trigger()
    assert (made, replayed, again) == (201, 200, after)
    assert after["number"] == first["number"] + 1
    numbers = stack.sql("SELECT number FROM builds_build WHERE pipeline_id = %s", pipeline)
    assert sorted(n for (n,) in numbers) == [first["number"], after["number"]]
    stack.wait_final([after["id"]])
    assert_settled(stack, runs)


@pytest.fixture(autouse=True)
def _stack_whole(stack):
    """Whatever a test killed is running again for the next one."""
    yield
    for name in ("web", "controller", "beat", *stack.AGENTS):
        if name not in stack.procs:
            stack.restart(name)
