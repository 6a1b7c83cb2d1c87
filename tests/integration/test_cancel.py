"""Cancellation with real agents, controller and beat: the API answers CANCELLING at once,
the step's whole process group dies, and the build always ends CANCELED."""

import os
import signal
import time

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework.test import APIClient

from builds import services
from builds.models import Build, JobRun, StepRun
from ciproject.celery import app
from tests.support import make_pipeline, one_step, process_alive, wait_for_build, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]


def hanging_pipeline(name: str, pids, runs_on: str = "linux"):
    """A step that starts a child and a grandchild, records their pids, and hangs; and a
    later stage that must never start."""
    return make_pipeline(
        name,
        f"""
stages:
  - name: work
    jobs:
      - id: hang
        runs-on: {runs_on}
        steps:
          - name: sleeps
            run: |
              echo "started"
              sleep 600 & echo $! >> {pids}
              bash -c 'sleep 600 & echo $! >> {pids}; wait' &
              echo $! >> {pids}
              wait
  - name: after
    jobs:
      - {{id: later, steps: [{{run: echo never}}]}}
""",
    )


def api_client(*perms) -> APIClient:
    client = APIClient()
    user = User.objects.create_superuser("boss") if not perms else User.objects.create_user("x")
    client.force_authenticate(user)
    return client


def recorded_pids(path, count=3):
    return wait_until(
        lambda: (
            path.exists() and len(ids := path.read_text().split()) >= count and list(map(int, ids))
        ),
        timeout=30,
        message="the step's processes to start",
    )


def test_cancel_running_build_kills_children_and_grandchildren(tmp_path):
    pids_file = tmp_path / "pids"
    build = services.trigger_build(hanging_pipeline("hang", pids_file))
    pids = recorded_pids(pids_file)
    response = api_client().post(f"/api/builds/{build.pk}/cancel/")
    assert (response.status_code, response.json()) == (202, {"status": "CANCELLING"})
    build = wait_for_build(build, timeout=20)
    assert build.status == "CANCELED"
    assert build.finished_at is not None
    # All gone within the grace period (3 s here): sleep exits on SIGTERM at once.
    assert (build.finished_at - build.cancel_requested_at).total_seconds() < 3
    wait_until(
        lambda: not any(process_alive(p) for p in pids), timeout=3, message="processes to die"
    )
    step = StepRun.objects.get(job__build=build, job__key="hang")
    assert step.status == "CANCELED"
    log = services.step_log(step)
    assert "started" in log
    assert "cancelled" in log
    later = JobRun.objects.get(build=build, key="later")
    assert (later.status, later.started_at) == ("CANCELED", None)
    assert JobRun.objects.get(build=build, key="hang").status == "CANCELED"


def test_cancel_build_whose_job_waits_for_an_agent():
    build = services.trigger_build(
        make_pipeline("nowhere", one_step("true", runs_on="no-such-label"))
    )
    assert JobRun.objects.get(build=build).status == "QUEUED"
    assert services.request_cancel(build.pk) == "CANCELLING"
    build = wait_for_build(build, timeout=10)
    assert build.status == "CANCELED"
    assert StepRun.objects.get(job__build=build).status == "CANCELED"


def test_double_cancel_and_cancel_of_a_finished_build(tmp_path):
    build = services.trigger_build(hanging_pipeline("twice", tmp_path / "pids"))
    recorded_pids(tmp_path / "pids")
    client = api_client()
    assert client.post(f"/api/builds/{build.pk}/cancel/").status_code == 202
    again = client.post(f"/api/builds/{build.pk}/cancel/")
    assert (again.status_code, again.json()) == (202, {"status": "CANCELLING"})
    assert wait_for_build(build, timeout=20).status == "CANCELED"
    late = client.post(f"/api/builds/{build.pk}/cancel/")
    assert late.status_code == 409
    assert late.json()["code"] == "BUILD_ALREADY_FINISHED"
    assert Build.objects.get(pk=build.pk).status == "CANCELED"


def test_cancel_racing_with_completion_ends_consistently():
    pipeline = make_pipeline("racy", one_step("true"))
    client = api_client()
    outcomes = []
    for i in range(15):
        build = services.trigger_build(pipeline)
        time.sleep(i * 0.005)  # not a wait: lands the cancel in a different phase each time
        answer = client.post(f"/api/builds/{build.pk}/cancel/").status_code
        build = wait_for_build(build, timeout=20)
        steps = set(StepRun.objects.filter(job__build=build).values_list("status", flat=True))
        if answer == 202:
            # A step that ended before the cancel keeps its result; the build is CANCELED.
            assert build.status == "CANCELED"
            assert steps <= {"CANCELED", "SUCCEEDED"}
        else:
            assert (answer, build.status, steps) == (409, "SUCCEEDED", {"SUCCEEDED"})
        outcomes.append(build.status)
    assert "CANCELED" in outcomes


def test_cancel_requires_the_cancel_permission(tmp_path):
    build = services.trigger_build(make_pipeline("perm", one_step("true")))
    client = APIClient()
    viewer = User.objects.create_user("viewer")
    client.force_authenticate(viewer)
    response = client.post(f"/api/builds/{build.pk}/cancel/")
    assert (response.status_code, response.json()["code"]) == (404, "NOT_FOUND")  # unseen
    viewer.user_permissions.add(Permission.objects.get(codename="view_build"))
    client.force_authenticate(User.objects.get(pk=viewer.pk))
    response = client.post(f"/api/builds/{build.pk}/cancel/")
    assert (response.status_code, response.json()["code"]) == (403, "PERMISSION_DENIED")
    assert APIClient().post(f"/api/builds/{build.pk}/cancel/").status_code == 401
    wait_for_build(build)


def test_a_cancel_on_a_killed_agent_ends_when_the_agent_is_found_lost(workers, tmp_path):
    """No agent confirms the stop: the cancel ends once the server may be sure nothing of
    the build runs, when the lost-agent sweep fails the agent's job (the watchdog would wait
    longer still: see builds.services.cancellation.force_after)."""
    workers.start_agent("agent-doomed", "doomed")
    workers.wait_ready(["agent-doomed"])
    pids_file = tmp_path / "pids"
    build = services.trigger_build(hanging_pipeline("doomed", pids_file, runs_on="doomed"))
    pids = recorded_pids(pids_file)
    workers.stop("agent-doomed", signal.SIGKILL)
    try:
        assert services.request_cancel(build.pk) == "CANCELLING"
        build = wait_for_build(build, timeout=30)  # lost after 12 s, swept every second
        assert build.status == "CANCELED"
        job = JobRun.objects.get(build=build, key="hang")
        assert (job.status, job.agent) == ("CANCELED", "agent-doomed")
        assert "agent agent-doomed was lost" in job.reason
    finally:
        for pid in pids:  # the killed agent's step outlived it; clean up after the test
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_queued_job_message_of_a_cancelled_build_is_revoked(tmp_path):
    """A job waiting behind a busy agent: its message is dropped by the agent, unrun."""
    from django_celery_results.models import TaskResult

    blocker = services.trigger_build(hanging_pipeline("blocker", tmp_path / "pids", "big"))
    recorded_pids(tmp_path / "pids")  # agent-2, the only "big" agent, is now busy
    waiting = services.trigger_build(make_pipeline("waiting", one_step("true", runs_on="big")))
    job = JobRun.objects.get(build=waiting)
    assert services.request_cancel(waiting.pk) == "CANCELLING"
    assert wait_for_build(waiting, timeout=10).status == "CANCELED"
    task_id = f"job-{job.pk}-{job.attempt}"
    wait_until(
        lambda: any(
            task_id in ids for ids in (app.control.inspect(timeout=1).revoked() or {}).values()
        ),
        timeout=10,
        message="the agents to hold the job's message as revoked",
    )
    services.request_cancel(blocker.pk)  # frees agent-2, which now takes the waiting message
    assert wait_for_build(blocker, timeout=20).status == "CANCELED"
    wait_until(
        lambda: TaskResult.objects.filter(task_id=task_id, status="REVOKED").exists(),
        timeout=10,
        message="the revoked message to be dropped",
    )
    job.refresh_from_db()
    assert (job.status, job.started_at, job.agent) == ("CANCELED", None, "")
