"""A result an agent writes again because the answer to its first write was lost with the
connection (the commit went through): the same result again is a success, never taken for
a stale write (before the fix, a succeeded job then ended CANCELED "no longer running"),
and a log chunk sent again loses nothing printed since."""

import copy

import pytest
from django.db import OperationalError

from agents.process.executor import LogWriter
from builds import services
from builds.models import JobRun, StepRun
from tests.support import make_pipeline, one_step

pytestmark = pytest.mark.django_db


@pytest.fixture
def running_step():
    build = services.trigger_build(make_pipeline("p", one_step("true", runs_on="unit-tests")))
    job = services.start_job(JobRun.objects.get(build=build).pk, 1, "a1")
    step = job.steps.get()
    step.job = job
    assert services.start_step(step)
    return step


def test_a_step_result_written_twice_is_recorded_once_and_answered_twice(running_step):
    first = services.finish_step(running_step, 1, "SUCCEEDED", 0, {"OUT": "x"})
    again = services.finish_step(running_step, 1, "SUCCEEDED", 0, {"OUT": "x"})
    assert (first, again) == ("SUCCEEDED", "SUCCEEDED")
    # Another result for the same attempt is still refused: that is not a retried write.
    assert services.finish_step(running_step, 1, "FAILED", 1, {}) is None
    assert StepRun.objects.get(pk=running_step.pk).status == "SUCCEEDED"


def test_a_job_end_written_twice_is_a_success_both_times(running_step):
    job = running_step.job
    services.finish_step(running_step, 1, "SUCCEEDED", 0, {})
    assert services.finish_job(job, "SUCCEEDED") is True
    assert services.finish_job(job, "SUCCEEDED") is True
    assert services.finish_job(job, "FAILED", "other") is False
    assert JobRun.objects.get(pk=job.pk).status == "SUCCEEDED"


def test_an_automatic_retry_written_twice_moves_one_attempt(running_step):
    lost_answer = copy.copy(running_step)  # what the agent holds when the answer is lost
    assert services.next_attempt(running_step)
    assert services.next_attempt(lost_answer)  # sent again: the same move, recorded once
    assert lost_answer.attempt == running_step.attempt == 2
    assert StepRun.objects.get(pk=running_step.pk).attempt == 2


@pytest.mark.django_db(transaction=True)  # the writer closes a connection it thinks lost
def test_a_log_chunk_sent_again_loses_nothing_printed_since(running_step, monkeypatch):
    append_log, lost = services.append_log, []

    def commit_then_lose_the_answer(*args):
        append_log(*args)
        if not lost:
            lost.append(args)
            raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "append_log", commit_then_lose_the_answer)
    writer = LogWriter(running_step)
    writer.write("one\n")  # stored, but the agent does not know it
    writer.write("two\n")
    writer.write("three\n", final=True)
    assert services.step_log(running_step) == "one\ntwo\nthree\n"
