"""A job whose message the broker lost is sent again, on the real Redis broker."""

from datetime import timedelta

import pytest
import redis
from django.utils import timezone

from agents import services as agents
from builds import services
from builds.models import JobRun
from dispatch.placement import resend_lost_jobs
from tests.conftest import TEST_BROKER_URL
from tests.support import make_pipeline, one_step

QUEUE = "jobs.lost-messages"


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_message_was_lost_is_sent_again_once_an_agent_idles():
    broker = redis.Redis.from_url(TEST_BROKER_URL)
    broker.delete(QUEUE)
    build = services.trigger_build(make_pipeline("p", one_step("true", "lost-messages")))
    job = JobRun.objects.get(build=build)
    assert broker.llen(QUEUE) == 1
    broker.delete(QUEUE)  # the broker lost it
    later = timezone.now() + timedelta(seconds=61)
    assert resend_lost_jobs(later) == []  # no agent could have taken it: nothing is lost

    agents.register_agent("idle-1", "host", ["lost-messages"], 1, "1")
    assert resend_lost_jobs(timezone.now()) == []  # not waiting long enough yet
    assert resend_lost_jobs(later) == [job.pk]
    assert broker.llen(QUEUE) == 1
    assert resend_lost_jobs(later) == []  # at most once per JOB_RESEND_AFTER_SECONDS
    assert resend_lost_jobs(later + timedelta(seconds=61)) == [job.pk]
    broker.delete(QUEUE)


@pytest.mark.django_db(transaction=True)
def test_a_job_waiting_behind_busy_or_leased_agents_is_not_resent():
    agents.register_agent("busy-1", "host", ["lost-messages"], 1, "1")
    pipeline = make_pipeline("p", one_step("true", "lost-messages"))
    running = services.trigger_build(pipeline)
    services.start_job(JobRun.objects.get(build=running).pk, 1, "busy-1")
    waiting = services.trigger_build(pipeline)
    later = timezone.now() + timedelta(seconds=61)
    assert resend_lost_jobs(later) == []  # the only agent is busy: the job waits its turn
    assert JobRun.objects.get(build=waiting).status == "QUEUED"
    redis.Redis.from_url(TEST_BROKER_URL).delete(QUEUE)
