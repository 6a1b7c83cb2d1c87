"""The agent registry on the database: heartbeats, lost agents and their jobs, and jobs that
wait for an agent with their label."""

from datetime import timedelta

import pytest
import time_machine
from django.db.models import F
from django.utils import timezone

from agents import services
from agents.models import Agent
from builds import services as builds
from builds.models import Build, JobRun
from builds.services.sweeps import fail_unplaced_jobs
from tests.support import REUSE, make_pipeline, one_step


def silent_for(agent: str, seconds: float) -> None:
    """As if its last heartbeat were `seconds` older (heartbeats are aged by the database's
    clock, which time-machine does not move)."""
    Agent.objects.filter(name=agent).update(
        last_heartbeat=F("last_heartbeat") - timedelta(seconds=seconds)
    )


def running_job_on(agent: str):
    build = builds.trigger_build(make_pipeline("p", one_step("sleep 60", runs_on="unit-tests")))
    job = builds.start_job(JobRun.objects.get(build=build).pk, 1, agent)
    step = job.steps.get()
    step.job = job
    builds.start_step(step)
    return build, job


@pytest.mark.django_db
def test_heartbeat_reports_the_status_an_operator_set():
    agent = services.register_agent("a1", "host", ["linux"], 2, "1")
    assert services.heartbeat("a1") == "online"
    services.set_status(agent, "disabled")
    assert services.heartbeat("a1") == "disabled"
    assert services.heartbeat("nobody") is None


@pytest.mark.django_db
def test_a_lost_agent_goes_offline_and_its_jobs_fail_naming_it(settings):
    settings.AGENT_OFFLINE_AFTER_SECONDS = 30
    services.register_agent("a1", "host", ["unit-tests"], 1, "1")
    build, job = running_job_on("a1")
    assert services.mark_lost_agents() == []
    silent_for("a1", 31)
    assert services.mark_lost_agents() == ["a1"]
    assert Agent.objects.get(name="a1").status == "offline"
    job.refresh_from_db()
    assert job.status == "FAILED"
    assert "agent a1 was lost: it stopped heartbeating for 30 s" in job.reason
    step = job.steps.get()
    assert step.status == "FAILED"
    assert "agent a1 was lost" in builds.step_log(step)
    assert builds.advance_build(build.pk) == "FAILED"


@pytest.mark.django_db
def test_an_agent_that_restarts_fails_what_its_previous_process_ran():
    services.register_agent("a1", "host", ["unit-tests"], 1, "1")
    _, job = running_job_on("a1")
    services.register_agent("a1", "host", ["unit-tests"], 1, "1")
    job.refresh_from_db()
    assert (job.status, "restarted while running this job" in job.reason) == ("FAILED", True)


@pytest.mark.django_db
def test_a_job_waits_for_an_agent_with_its_label_then_fails(settings):
    settings.JOB_WAIT_TIMEOUT_SECONDS = 600
    build = builds.trigger_build(make_pipeline("p", one_step("true", runs_on="gpu")))
    job = JobRun.objects.get(build=build)
    assert (job.status, job.reason) == ("QUEUED", "waiting: no online agent has the label 'gpu'")
    assert fail_unplaced_jobs() == []
    with time_machine.travel(timezone.now() + timedelta(seconds=601), tick=False):
        assert fail_unplaced_jobs() == [job.pk]
    job.refresh_from_db()
    assert job.status == "FAILED"
    assert job.reason == "no agent with the label 'gpu' took this job within 600 s"
    assert Build.objects.get(pk=build.pk).status == "FAILED"


@pytest.mark.django_db
def test_a_lost_agent_frees_its_lease_and_fails_the_jobs_bound_to_it(settings):
    from agents.models import AgentLease

    settings.AGENT_OFFLINE_AFTER_SECONDS = 30
    services.register_agent("a1", "host", ["unit-tests"], 1, "1")
    pipeline = make_pipeline("reuse", REUSE)
    build = builds.trigger_build(pipeline)
    make = builds.start_job(JobRun.objects.get(build=build, key="make").pk, 1, "a1")
    assert AgentLease.objects.get().build_id == build.pk  # `make` leased a1 to the build
    builds.finish_job(make, "SUCCEEDED")
    assert builds.advance_build(build.pk) == "RUNNING"  # `use` is sent to a1's own queue
    use = JobRun.objects.get(build=build, key="use")
    assert use.status == "QUEUED"
    silent_for("a1", 31)
    services.mark_lost_agents()
    use.refresh_from_db()
    assert use.status == "FAILED"
    assert "agent a1 was lost" in use.reason
    assert not AgentLease.objects.exists()


@pytest.mark.django_db
def test_an_agent_whose_clock_is_behind_is_not_taken_for_lost(settings):
    """The heartbeat's time is the database's, not the agent's: an agent 40 s behind, with
    the timeout at 30 s, stays online and keeps its job."""
    settings.AGENT_OFFLINE_AFTER_SECONDS = 30
    with time_machine.travel(timezone.now() - timedelta(seconds=40)):  # the agent's clock
        services.register_agent("slow", "host", ["unit-tests"], 1, "1")
        _, job = running_job_on("slow")
        assert services.heartbeat("slow") == "online"
    assert services.mark_lost_agents() == []
    job.refresh_from_db()
    assert (job.status, Agent.objects.get(name="slow").status) == ("RUNNING", "online")


@pytest.mark.django_db
def test_agents_gone_for_good_cost_the_sweep_nothing_each(settings, django_assert_num_queries):
    """Only an offline agent something is still recorded on (here a job left RUNNING on it,
    as by a sweep that missed it) is cleaned up again; the others cost the sweep nothing."""
    settings.AGENT_OFFLINE_AFTER_SECONDS = 30
    for n in range(50):
        services.register_agent(f"gone{n}", "host", ["unit-tests"], 1, "1")
    with django_assert_num_queries(2):  # the UPDATE, the offline agents: none
        assert services.mark_lost_agents() == []
    Agent.objects.update(status="offline")
    with django_assert_num_queries(7):  # and five lookups for all 50 at once
        assert services.mark_lost_agents() == []

    services.register_agent("a1", "host", ["unit-tests"], 1, "1")
    _, job = running_job_on("a1")
    Agent.objects.filter(name="a1").update(status="offline")
    assert services.mark_lost_agents() == []  # not newly lost, but still running a job
    job.refresh_from_db()
    assert job.status == "FAILED"
    assert "agent a1 was lost: it is offline" in job.reason
