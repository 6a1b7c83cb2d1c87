"""The agent registry on the database: heartbeats, lost agents and their jobs, and jobs that
wait for an agent with their label."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from agents import services
from agents.models import Agent
from builds import services as builds
from builds.models import Build, JobRun
from builds.services.sweeps import fail_unplaced_jobs
from tests.support import REUSE, make_pipeline, one_step


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
    with time_machine.travel(timezone.now() + timedelta(seconds=31), tick=False):
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
    with time_machine.travel(timezone.now() + timedelta(seconds=31), tick=False):
        services.mark_lost_agents()
    use.refresh_from_db()
    assert use.status == "FAILED"
    assert "agent a1 was lost" in use.reason
    assert not AgentLease.objects.exists()
