"""Agents on hosts of their own (tests.faults.network), cut off the network while they run a
step of a `max_running: 1` group with a second build queued behind it. However the cut goes,
the second build's step starts only once the first one's processes are gone: both steps write
timestamps into one file (each host's clock is this machine's), the first one's last tick is
when it died. Every case runs with Redis and with RabbitMQ as the broker.

The fault stack's timing: heartbeat 1 s, fence 5 s, kill grace 2 s, lost after 8 s. Each
case prints its figures (seconds after the cut the step was stopped, seconds after that the
next build started); `pytest -s` shows them."""

import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.network import Host
from tests.faults.stack import (
    PostgresServer,
    RabbitBroker,
    RedisServer,
    assert_settled,
    running_stack,
)
from tests.support import wait_until

AGENTS = {"host-a": "netns", "host-b": "netns"}

# The step ignores SIGTERM, so only the kill after the grace period ends it. Its marks:
# `<build number> start|tick|end <time>`.
TICKER = """
concurrency: cut
variables: {MARKS: "", RUN_FOR: "0"}
stages:
  - name: only
    jobs:
      - id: tick
        runs-on: netns
        steps:
          - run: |
              trap '' TERM
              mark() { echo "$CI_BUILD_NUMBER $1 $(date +%s.%N)" >> "$MARKS"; }
              mark start
              end=$(( $(date +%s) + RUN_FOR ))
              while [ "$(date +%s)" -lt "$end" ]; do mark tick; sleep 0.1; done
              mark end
"""


@pytest.fixture(scope="module")
def hosts():
    made = {}
    try:
        for index, name in enumerate(AGENTS):
            made[name] = Host(index)
        yield made
    finally:
        for host in made.values():
            host.remove()


@pytest.fixture(scope="module")
def database(hosts):
    server = PostgresServer(addresses=[h.address["db"] for h in hosts.values()])
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker_url(request, hosts, tmp_path_factory):
    """The broker, reachable from each host at its broker link: a Redis of the test's own
    listening there, or the machine's RabbitMQ (which listens on loopback only) through a
    socat relay there."""
    if request.param == "redis":
        server = RedisServer(
            tmp_path_factory.mktemp("redis"), [h.address["broker"] for h in hosts.values()]
        )
        server.start()
        yield server.url
        server.stop()
        return
    rabbit = RabbitBroker()
    relays = [relay(h.address["broker"], 5672) for h in hosts.values()]
    try:
        yield rabbit.url
    finally:
        for process in relays:
            process.kill()
            process.wait()
        rabbit.remove()


def relay(address: str, port: int) -> subprocess.Popen:
    """Forward `address:port` to the same port on loopback."""
    listen = f"TCP-LISTEN:{port},bind={address},reuseaddr,fork"
    return subprocess.Popen(["socat", listen, f"TCP:127.0.0.1:{port}"])


@pytest.fixture(scope="module")
def stack(database, broker_url, hosts, tmp_path_factory):
    db = "cuts_" + ("amqp" if broker_url.startswith("amqp") else "redis")
    with running_stack(
        database.url(db), broker_url, tmp_path_factory, agents=AGENTS, hosts=hosts
    ) as stack:
        stack.policy("cut", max_running=1, queue_length=5)
        stack.pipeline_id = stack.pipeline("cut", TICKER)
        yield stack


class Marks:
    """The steps' timestamps, read from the one file both hosts write."""

    def __init__(self, path: Path):
        self.path = path

    def of(self, build: dict, event: str) -> list[float]:
        if not self.path.exists():
            return []
        lines = (line.split() for line in self.path.read_text().splitlines())
        return [float(t) for n, e, t in lines if int(n) == build["number"] and e == event]

    def last(self, build: dict) -> float:
        return max(self.of(build, "start") + self.of(build, "tick") + self.of(build, "end"))

    def started(self, build: dict) -> float | None:
        return next(iter(self.of(build, "start")), None)


@pytest.fixture
def marks(tmp_path):
    return Marks(tmp_path / "marks")


def start_first_build(stack, marks, run_for: int) -> tuple[dict, dict, str]:
    """Build 1 running its step, build 2 queued behind it; returns them and build 1's agent.
    Both agents answer on the broker first: each case starts from a whole stack."""
    stack.wait_ready(AGENTS)
    # And each agent's lease is fresh: a cut of the case before may have left its database
    # connection reconnecting, and a fence that is nearly due would end this case's step. A
    # heartbeat held up by that cut lands late, stamped fresh, yet renews the agent's lease
    # only from when it was sent: wait for one sent after it (heartbeats are 1 s apart).
    [(since,)] = stack.sql("SELECT now() + interval '1.5 seconds'")
    fresh = "SELECT count(*) FROM agents_agent WHERE name = ANY(%s) AND last_heartbeat > %s"
    wait_until(
        lambda: stack.sql(fresh, list(AGENTS), since)[0][0] == len(AGENTS),
        timeout=30,
        message="every agent's heartbeat to reach the database",
    )
    first = stack.trigger(stack.pipeline_id, MARKS=str(marks.path), RUN_FOR=str(run_for))
    wait_until(lambda: marks.started(first), timeout=30, message="the first step to start")
    second = stack.trigger(stack.pipeline_id, MARKS=str(marks.path), RUN_FOR="1")
    assert second["status"] == "QUEUED", second
    [(agent,)] = stack.sql("SELECT agent FROM builds_jobrun WHERE build_id = %s", first["id"])
    return first, second, agent


def job_reason(stack, build: dict) -> str:
    return stack.sql("SELECT reason FROM builds_jobrun WHERE build_id = %s", build["id"])[0][0]


def one_after_the_other(case: str, marks, first: dict, second: dict, cut_at: float) -> None:
    """Once all is over: build 2's step started after build 1's last mark (its death), on
    whichever host. Prints the case's figures."""
    died, started = marks.last(first), marks.started(second)
    assert started > died, f"build 2 started {died - started:.2f} s before build 1's step died"
    print(
        f"\n[{case}] step stopped {died - cut_at:.2f} s after the cut;"
        f" the next build's step started {started - died:.2f} s after that"
    )


def wait_back_online(stack, agent: str) -> None:
    online = "SELECT status FROM agents_agent WHERE name = %s"
    wait_until(lambda: stack.sql(online, agent) == [("online",)], timeout=60,
               message=f"{agent} to be back online")  # fmt: skip


def cut_until_the_next_build_starts(stack, hosts, marks, services=()) -> tuple:
    """Cut build 1's agent off (from every service, or those named) until build 2's step has
    started elsewhere, then heal. Returns the builds, the agent, and when the cut began."""
    first, second, agent = start_first_build(stack, marks, run_for=120)
    cut_at = time.time()
    with hosts[agent].cut_off(*services):
        wait_until(lambda: marks.started(second), timeout=60,
                   message="the queued build's step to start")  # fmt: skip
    return first, second, agent, cut_at


@pytest.mark.parametrize("services", [(), ("db",)], ids=["whole-host", "database-only"])
def test_cut_longer_than_the_lost_agent_timeout(stack, hosts, marks, services):
    """The agent fences itself and kills its step before the server frees the slot; the next
    build starts after the step died; once healed, the agent says what it stopped and the
    step is not resumed."""
    first, second, agent, cut_at = cut_until_the_next_build_starts(stack, hosts, marks, services)
    assert stack.wait_final([first["id"], second["id"]]) == {
        first["id"]: "FAILED",
        second["id"]: "SUCCEEDED",
    }
    assert agent in job_reason(stack, first)
    wait_back_online(stack, agent)
    log = stack.log_dir / f"{agent}.log"
    wait_until(lambda: "reaches the database again; it had stopped" in log.read_text(),
               timeout=30, message="the agent to report what it stopped")  # fmt: skip
    assert "fenced itself" in log.read_text()
    assert_settled(stack)
    assert not marks.of(first, "end")  # stopped, and never resumed
    one_after_the_other(f"cut {'+'.join(services) or 'host'}", marks, first, second, cut_at)


def test_cut_shorter_than_the_fence_time(stack, hosts, marks):
    """A blip: the step goes on, its job succeeds, the queued build runs after it."""
    first, second, agent = start_first_build(stack, marks, run_for=5)
    with hosts[agent].cut_off():
        time.sleep(2)  # the cut's length (the fence time is 5 s)
    assert stack.wait_final([first["id"], second["id"]]) == {
        first["id"]: "SUCCEEDED",
        second["id"]: "SUCCEEDED",
    }
    assert marks.of(first, "end")
    assert_settled(stack)
    assert marks.started(second) > marks.last(first)


def test_broker_only_cut(stack, hosts, marks):
    """The lease lives in PostgreSQL, which the agent still reaches: it is not lost, its step
    runs to its end across the cut, its result is recorded, and the queued build runs after."""
    first, second, agent = start_first_build(stack, marks, run_for=12)
    with hosts[agent].cut_off("broker"):
        wait_until(lambda: marks.of(first, "end"), timeout=60, message="the step to end")
        ended = stack.wait_final([first["id"]])
        assert ended == {first["id"]: "SUCCEEDED"}, job_reason(stack, first)
    assert stack.wait_final([second["id"]]) == {second["id"]: "SUCCEEDED"}
    assert_settled(stack)
    assert marks.started(second) > marks.last(first)


def test_cut_during_a_cancel(stack, hosts, marks):
    """Cancelled while cut off: the answer is at once, the build ends CANCELED, and its slot
    goes to the next build only after the step the agent could not be told to stop is dead."""
    first, second, agent = start_first_build(stack, marks, run_for=120)
    cut_at = time.time()
    with hosts[agent].cut_off():
        status, body = stack.api("POST", f"/api/builds/{first['id']}/cancel/")
        assert (status, body["status"]) == (202, "CANCELLING"), body
        wait_until(lambda: marks.started(second), timeout=60,
                   message="the queued build's step to start")  # fmt: skip
    assert stack.wait_final([first["id"], second["id"]]) == {
        first["id"]: "CANCELED",
        second["id"]: "SUCCEEDED",
    }
    wait_back_online(stack, agent)
    assert_settled(stack)
    one_after_the_other("cut during a cancel", marks, first, second, cut_at)
