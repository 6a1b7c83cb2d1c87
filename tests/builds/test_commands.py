"""The operators' commands answer like the API: the same services, the same error codes."""

import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from builds import services
from builds.models import Build, JobRun, StepRun
from tests.processes import ROOT
from tests.support import PARALLEL, fail_fast_job, make_pipeline


@pytest.mark.django_db(transaction=True)
def test_cancel_answers_cancelling_and_refuses_a_finished_or_unknown_build(capsys):
    build = services.trigger_build(make_pipeline("web", PARALLEL))
    call_command("cancel", str(build.pk))
    assert capsys.readouterr().out.strip() == "CANCELLING"
    assert services.finish_cancel(build.pk) == "CANCELED"  # what the controller does next
    with pytest.raises(CommandError, match=r"^BUILD_ALREADY_FINISHED: build .* ended CANCELED"):
        call_command("cancel", str(build.pk))
    with pytest.raises(CommandError, match=r"^BUILD_NOT_FOUND"):
        call_command("cancel", str(10**9))


@pytest.mark.django_db(transaction=True)
def test_retrystep_reruns_a_failed_step_and_refuses_one_that_did_not_fail(capsys):
    build = services.trigger_build(make_pipeline("web", PARALLEL))
    step = fail_fast_job(build)
    call_command("retrystep", str(build.pk), str(step.pk))
    assert capsys.readouterr().out.strip() == f"step {step.name!r} attempt 2: PENDING"
    assert JobRun.objects.get(pk=step.job_id).status == "QUEUED"
    slow = StepRun.objects.get(job__build=build, job__key="slow")
    with pytest.raises(CommandError, match=r"^STEP_NOT_RETRYABLE: step .* is PENDING"):
        call_command("retrystep", str(build.pk), str(slow.pk))
    assert Build.objects.get(pk=build.pk).status == "RUNNING"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DATABASE_URL": "postgres://postgres@127.0.0.1:1/ciproject"}, "PostgreSQL at"),
        ({"CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}, "the Celery broker at"),
    ],
)
def test_commands_name_the_service_that_is_down_without_a_traceback(worker_env, env, named):
    done = subprocess.run(
        [sys.executable, "manage.py", "trigger", "hello"],
        cwd=ROOT,
        env={**worker_env, **env},  # the test database and broker, but for the one down
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert named in done.stderr
    assert "unreachable" in done.stderr
    assert "Traceback" not in done.stderr
