"""Priorities in a concurrency group's queue: higher first, FIFO within one, a step retry
still at the head, evict_oldest taking the oldest of the lowest; and a trigger's priority
bounded by its pipeline's max-priority, at every door."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from builds import services
from builds.errors import InvalidPriority
from builds.models import Build, JobRun
from concurrency.errors import PipelineQueueFull
from tests.concurrency.test_admission import finish, governed, policy, statuses
from tests.support import PARALLEL, client_for, fail_fast_job

PRIORITIES = "priority: 1\nmax-priority: 9\n" + PARALLEL.lstrip()


@pytest.mark.django_db(transaction=True)
def test_the_queue_starts_higher_priorities_first_and_fifo_within_one():
    pipeline = governed("web", policy(queue_length=10), PRIORITIES)
    running = services.trigger_build(pipeline)
    low, high, default, high_too = (
        services.trigger_build(pipeline, priority=p) for p in (0, 5, None, 5)
    )
    assert [b.priority for b in (low, high, default, high_too)] == [0, 5, 1, 5]
    queued = (high, high_too, default, low)
    for ended, started in zip((running, high, high_too, default), queued, strict=True):
        finish(ended)
        assert statuses(*queued)[queued.index(started)] == "RUNNING"
        assert statuses(*queued).count("RUNNING") == 1
    assert statuses(low) == ["RUNNING"]


@pytest.mark.django_db(transaction=True)
def test_a_step_retry_goes_before_every_priority():
    pipeline = governed("web", policy(queue_length=5), PRIORITIES)
    a = services.trigger_build(pipeline, priority=0)
    step = fail_fast_job(a)
    JobRun.objects.filter(build=a, key="slow").update(status="SUCCEEDED")
    assert services.advance_build(a.pk) == "FAILED"
    b = services.trigger_build(pipeline)  # takes the slot
    urgent = services.trigger_build(pipeline, priority=9)
    services.retry_step(a.pk, step.pk)
    finish(b)
    assert statuses(a, urgent) == ["RUNNING", "QUEUED"]


@pytest.mark.django_db(transaction=True)
def test_evict_oldest_evicts_the_oldest_of_the_lowest_priority():
    pipeline = governed("web", policy(queue_length=2, on_queue_full="evict_oldest"), PRIORITIES)
    services.trigger_build(pipeline)
    older_high, low = (
        services.trigger_build(pipeline, priority=5),
        services.trigger_build(pipeline, priority=2),
    )
    newest = services.trigger_build(pipeline, priority=3)  # the queue is full: `low` goes
    assert statuses(older_high, low, newest) == ["QUEUED", "CANCELED", "QUEUED"]
    with pytest.raises(PipelineQueueFull) as full:  # both queued are above it: it is refused
        services.trigger_build(pipeline, priority=1)
    assert "each queued build has a priority above 1" in full.value.detail
    assert Build.objects.filter(pipeline=pipeline).count() == 4


@pytest.mark.django_db
def test_a_priority_above_the_maximum_is_refused_at_every_door(admin_client):
    pipeline = governed("web", policy(queue_length=5), PRIORITIES)
    with pytest.raises(InvalidPriority) as refused:
        services.trigger_build(pipeline, priority=10)
    assert refused.value.detail == "priority: 10 is above this pipeline's max-priority of 9"
    with pytest.raises(InvalidPriority):
        services.trigger_build(pipeline, priority=-1)
    answer = client_for("builds.add_build").post(
        f"/api/pipelines/{pipeline.pk}/builds/", {"priority": 10}, format="json"
    )
    assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_PRIORITY")
    with pytest.raises(CommandError, match="INVALID_PRIORITY"):
        call_command("trigger", "web", "--priority", "10")
    page = admin_client.post(
        f"/admin/builds/pipeline/{pipeline.pk}/trigger/",
        {"idempotency_key": "k1", "priority": "10"},
        follow=True,
    )
    assert "INVALID_PRIORITY: priority: 10 is above" in page.content.decode()
    assert Build.objects.count() == 0
    pipeline.refresh_from_db()
    assert pipeline.last_build_number == 0
    answer = client_for("builds.add_build").post(
        f"/api/pipelines/{pipeline.pk}/builds/", {"priority": 9}, format="json"
    )
    assert (answer.status_code, answer.json()["priority"]) == (201, 9)
