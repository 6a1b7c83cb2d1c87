"""Agent reuse on real agents: a later job runs on the agent (and in the workspace) of the
job it reuses; two builds never share a leased agent; a retry lands on the same agent; a
stale message changes nothing; and no lease is ever left behind."""

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from agents.models import AgentLease
from builds import services
from builds.models import Build, JobRun, StepRun
from ciproject.celery import app
from ciproject.protocol import agent_queue
from tests.support import make_pipeline, wait_for_build, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


def reuse_pipeline(name: str, label: str, second: str = "cat out.txt", pause: str = "true"):
    return make_pipeline(
        name,
        f"""
stages:
  - name: build
    jobs:
      - id: make
        runs-on: {label}
        steps: [{{run: 'echo "made by $CI_BUILD_NUMBER" > out.txt; {pause}'}}]
  - name: use
    jobs:
      - id: use
        reuse: make
        steps: [{{run: '{second}; {pause}'}}]
""",
    )


def log_of(build, key):
    return services.step_log(StepRun.objects.get(job__build=build, job__key=key))


def test_a_reusing_job_runs_on_the_same_agent_in_the_same_workspace(dedicated):
    dedicated("agent-r1", "reuse-a")
    dedicated("agent-r2", "reuse-a")
    build = wait_for_build(services.trigger_build(reuse_pipeline("reuse", "reuse-a")))
    assert build.status == "SUCCEEDED"
    jobs = {j.key: j for j in JobRun.objects.filter(build=build)}
    assert jobs["use"].agent == jobs["make"].agent
    assert "made by 1" in log_of(build, "use")  # the file `make` left in its workspace
    wait_until(lambda: not AgentLease.objects.exists(), timeout=10, message="lease release")


def test_two_builds_never_share_a_leased_agent(dedicated):
    dedicated("agent-solo", "reuse-solo", capacity=2)
    pipeline = reuse_pipeline("exclusive", "reuse-solo", pause="sleep 0.5")
    first, second = services.trigger_build(pipeline), services.trigger_build(pipeline)
    assert wait_for_build(first, timeout=60).status == "SUCCEEDED"
    assert wait_for_build(second, timeout=60).status == "SUCCEEDED"
    spans = []
    for build in (first, second):
        jobs = JobRun.objects.filter(build=build)
        spans.append((min(j.started_at for j in jobs), max(j.finished_at for j in jobs)))
    (_, first_end), (second_start, _) = sorted(spans)
    assert first_end <= second_start, "the agent ran two builds' jobs while leased to one"
    wait_until(lambda: not AgentLease.objects.exists(), timeout=10, message="lease release")


def test_a_retry_of_a_reusing_job_runs_the_job_it_reuses_again_and_stale_messages_are_ignored(
    dedicated,
):
    dedicated("agent-r3", "reuse-b")
    dedicated("agent-r4", "reuse-b")
    pipeline = reuse_pipeline(
        "retry-reuse",
        "reuse-b",
        second='test -f out.txt || echo "no out.txt"; test "$CI_STEP_ATTEMPT" -ge 2',
    )
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "FAILED"
    first_use = JobRun.objects.get(build=build, key="use")
    assert first_use.agent == JobRun.objects.get(build=build, key="make").agent
    wait_until(lambda: not AgentLease.objects.exists(), timeout=10, message="lease release")

    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("ops"))
    assert client.post(f"/api/builds/{build.pk}/retry/", {}, format="json").status_code == 202
    build = wait_for_build(build, timeout=60)
    use, make = (JobRun.objects.get(build=build, key=key) for key in ("use", "make"))
    # The build's lease ended with it, and with the lease the workspace `use` works in: the
    # retry runs `make` again too, and `use` after it, on its agent, in its workspace.
    assert (build.status, make.attempt, use.attempt) == ("SUCCEEDED", 2, 2)
    assert use.agent == make.agent
    assert "no out.txt" not in log_of(build, "use")
    agent = use.agent

    # run_job stores no result on success (ciproject.celery.ERRORS_ONLY): this message asks.
    stale = app.send_task(
        "agents.tasks.run_job", args=(use.pk, 1), queue=agent_queue(agent), ignore_result=False
    )
    assert stale.get(timeout=20) is None  # attempt 1 is over: the message is fenced off
    use.refresh_from_db()
    assert (use.status, use.attempt) == ("SUCCEEDED", 2)
    assert Build.objects.get(pk=build.pk).status == "SUCCEEDED"
    wait_until(lambda: not AgentLease.objects.exists(), timeout=10, message="lease release")


def test_a_step_retry_of_a_reusing_job_goes_on_in_the_workspace_kept_after_the_build(dedicated):
    """`use` fails, so does the build, and its lease ends: the agent keeps the build's
    workspace (a failed job worked in it), and the step retry, back on that agent under a
    new lease, finds the file `make` left there."""
    dedicated("agent-r5", "reuse-c")
    pipeline = reuse_pipeline(
        "step-retry-reuse", "reuse-c", second='cat out.txt && test "$CI_STEP_ATTEMPT" -ge 2'
    )
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "FAILED"
    wait_until(lambda: not AgentLease.objects.exists(), timeout=10, message="lease release")
    step = StepRun.objects.get(job__build=build, job__key="use")
    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("ops"))
    response = client.post(f"/api/builds/{build.pk}/steps/{step.pk}/retry/")
    assert response.status_code == 202, response.json()
    assert wait_for_build(build, timeout=60).status == "SUCCEEDED"
    step.refresh_from_db()
    assert step.attempt == 2
    assert "made by" in services.step_log(step)
