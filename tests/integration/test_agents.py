"""Agents as real worker processes: capacity, a killed agent detected and its job failed with
its slot freed, draining an agent, and a clean shutdown."""

import signal
import socket
import time
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from agents import services as agents
from agents.models import Agent
from builds import services
from builds.models import Build, JobRun
from ciproject.celery import app
from concurrency.models import ConcurrencyPolicy
from tests.conftest import TEST_BROKER_URL
from tests.support import make_pipeline, one_step, wait_for_build, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


def queue_length(queue: str) -> int:
    return redis.Redis.from_url(TEST_BROKER_URL).llen(queue)


def test_an_agent_never_runs_more_jobs_than_its_capacity(dedicated, tmp_path):
    dedicated("agent-cap", "cap", capacity=2)
    gate = tmp_path / "gate"
    pipeline = make_pipeline(
        "cap", one_step(f"until [ -f {gate} ]; do sleep 0.05; done", runs_on="cap")
    )
    builds = [services.trigger_build(pipeline) for _ in range(3)]
    running = JobRun.objects.filter(build__in=builds, status="RUNNING")
    wait_until(lambda: running.count() == 2, message="two jobs to run")
    assert queue_length("jobs.cap") == 1  # the third waits in the broker, not on the agent
    assert JobRun.objects.filter(build__in=builds, status="QUEUED").count() == 1
    gate.touch()
    for build in builds:
        assert wait_for_build(build, timeout=30).status == "SUCCEEDED"
    assert set(JobRun.objects.filter(build__in=builds).values_list("agent", flat=True)) == {
        "agent-cap"
    }


def test_a_killed_agent_is_detected_its_job_fails_and_its_slot_goes_on(dedicated, workers):
    dedicated("agent-lost", "lost")
    policy = ConcurrencyPolicy.objects.create(
        name="shared", group_key="shared", max_running=1, queue_length=5
    )
    # The step outlives its killed agent (its own session): keep it short-lived.
    doomed_pipeline = make_pipeline("doomed", one_step("sleep 45", runs_on="lost"))
    next_pipeline = make_pipeline("next", one_step("true", runs_on="linux"))
    for pipeline in (doomed_pipeline, next_pipeline):
        pipeline.policy = policy
        pipeline.save()
    doomed = services.trigger_build(doomed_pipeline)
    waiting = services.trigger_build(next_pipeline)
    assert waiting.status == "QUEUED"
    wait_until(lambda: JobRun.objects.filter(build=doomed, status="RUNNING").exists())
    workers.stop("agent-lost", signal.SIGKILL)
    doomed = wait_for_build(doomed, timeout=30)  # offline after 12 s without a heartbeat
    job = JobRun.objects.get(build=doomed)
    assert (doomed.status, job.status) == ("FAILED", "FAILED")
    assert "agent agent-lost was lost" in job.reason
    assert Agent.objects.get(name="agent-lost").status == "offline"
    assert wait_for_build(waiting, timeout=30).status == "SUCCEEDED"  # the slot went on


def test_a_disabled_agent_finishes_its_job_and_takes_no_new_one(dedicated, tmp_path):
    dedicated("agent-drain", "drain")
    gate = tmp_path / "gate"
    pipeline = make_pipeline(
        "drain", one_step(f"until [ -f {gate} ]; do sleep 0.05; done", runs_on="drain")
    )
    first = services.trigger_build(pipeline)
    wait_until(lambda: JobRun.objects.filter(build=first, status="RUNNING").exists())
    agent = Agent.objects.get(name="agent-drain")
    agents.set_status(agent, "disabled")

    def stopped_consuming():
        nodes = app.control.inspect(timeout=1).active_queues() or {}
        queues = next((qs for node, qs in nodes.items() if node.startswith("agent-drain@")), [])
        names = [queue["name"] for queue in queues]
        return names and "jobs.drain" not in names

    wait_until(stopped_consuming, timeout=15, message="the agent to stop taking jobs")
    second = services.trigger_build(pipeline)
    gate.touch()
    assert wait_for_build(first, timeout=30).status == "SUCCEEDED"  # it finished its job
    assert queue_length("jobs.drain") == 1  # and took no new one
    assert Build.objects.get(pk=second.pk).status == "RUNNING"
    agents.set_status(agent, "online")
    assert wait_for_build(second, timeout=30).status == "SUCCEEDED"


def test_an_agent_stopped_cleanly_goes_offline_and_stays_offline(dedicated, workers):
    dedicated("agent-stop", "stop")
    agent = Agent.objects.filter(name="agent-stop")
    wait_until(lambda: agent.get().last_heartbeat > agent.get().started_at, message="a beat")
    process = workers.procs["agent-stop"]
    workers.stop("agent-stop")  # SIGTERM: a warm shutdown
    assert process.returncode == 0
    assert agent.get().status == "offline"  # marked by the agent itself, on its way out
    deadline = time.monotonic() + 3  # three heartbeat intervals: no late beat revives it
    while time.monotonic() < deadline:
        assert agent.get().status == "offline"
        time.sleep(0.1)


def agent_metrics(port: int) -> tuple[set[str], dict[tuple, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return {f.name for f in families}, samples


def test_a_build_node_serves_its_agents_own_metrics(dedicated):
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dedicated("agent-metrics", "metrics", env={"AGENT_METRICS_PORT": str(port)})
    _, before = agent_metrics(port)  # what an earlier run on this machine left counted
    ok = make_pipeline("m-ok", one_step("true", runs_on="metrics"))
    bad = make_pipeline("m-bad", one_step("exit 3", runs_on="metrics"))
    assert wait_for_build(services.trigger_build(ok)).status == "SUCCEEDED"
    assert wait_for_build(services.trigger_build(bad)).status == "FAILED"

    names, after = agent_metrics(port)
    mine = (("agent", "agent-metrics"),)

    def moved(name, *labels):
        key = (name, (*mine, *labels))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("ciproject_agent_steps_total", ("status", "SUCCEEDED")) == 1
    assert moved("ciproject_agent_steps_total", ("status", "FAILED")) == 1
    assert moved("ciproject_agent_step_seconds_count") == 2
    assert names <= {"ciproject_agent_steps", "ciproject_agent_step_seconds"}  # nothing else


def test_an_agent_lost_retry_runs_the_job_again_on_another_agent(dedicated, workers):
    dedicated("agent-doomed", "relost")
    pipeline = make_pipeline(
        "relost",
        """
stages:
  - name: s
    jobs:
      - id: j
        runs-on: relost
        steps:
          - {name: first, run: 'echo "first on attempt $CI_STEP_ATTEMPT"'}
          - name: long
            run: '[ "$CI_STEP_ATTEMPT" -ge 2 ] || sleep 30'
            retry: {max: 1, on: [agent-lost]}
""",
    )
    build = services.trigger_build(pipeline)
    wait_until(
        lambda: (
            JobRun.objects.filter(build=build, status="RUNNING").exists()
            and build.jobs.get().steps.get(name="long").status == "RUNNING"
        ),
        message="the long step to run",
    )
    dedicated("agent-spare", "relost")
    workers.stop("agent-doomed", signal.SIGKILL)
    build = wait_for_build(build, timeout=40)  # offline after 12 s, then again elsewhere
    job = JobRun.objects.get(build=build)
    steps = {step.name: step for step in job.steps.all()}
    assert (build.status, job.status, job.attempt, job.agent) == (
        "SUCCEEDED",
        "SUCCEEDED",
        2,
        "agent-spare",
    )
    assert (steps["first"].attempt, steps["long"].attempt) == (2, 2)  # from its first step
    assert "the job runs again on another agent" in services.step_log(steps["long"], 1)
    assert "first on attempt 2" in services.step_log(steps["first"], 2)


def test_an_agent_reports_how_it_contains_its_steps(admin_client):
    """As its process found out at its start: here cgroup v2 (this machine has it), with the
    limits it can set; in the API and on the admin's pages."""
    agent = wait_until(
        lambda: Agent.objects.filter(name="agent-1").exclude(containment="").first(),
        message="agent-1's registration",
    )
    assert agent.containment.startswith("cgroup v2 (/"), agent.containment
    assert "limits: " in agent.containment
    answer = admin_client.get(f"/api/agents/{agent.pk}/").json()
    assert answer["containment"] == agent.containment
    listed = admin_client.get("/admin/agents/agent/").content.decode()
    assert '<td class="field-containment_mode">cgroup v2</td>' in listed
