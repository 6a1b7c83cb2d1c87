"""Admission by concurrency policy, on the real database: start, queue, reject or evict;
groups across pipelines; cancel-in-progress; queue timeouts; live limits; step retries."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from builds import services
from builds.errors import StepNotFound, StepNotRetryable
from builds.models import Build, JobRun, StepRun
from concurrency.errors import PipelineQueueFull
from concurrency.models import ConcurrencyPolicy
from tests.support import PARALLEL, fail_fast_job, make_pipeline


def policy(**limits) -> ConcurrencyPolicy:
    values = {"name": "p", "max_running": 1, "queue_length": 2, "queue_timeout": 60} | limits
    return ConcurrencyPolicy.objects.create(**values)


def governed(name: str, pol: ConcurrencyPolicy, definition: str = PARALLEL):
    pipeline = make_pipeline(name, definition)
    pipeline.policy = pol
    pipeline.save()
    return pipeline


def statuses(*builds) -> list[str]:
    return [Build.objects.get(pk=b.pk).status for b in builds]


def finish(build, status="SUCCEEDED"):
    """End a build as its controller would (the slot frees once the transaction commits)."""
    from builds.services.progress import finish_build

    finish_build(Build.objects.get(pk=build.pk), status)


@pytest.mark.django_db
def test_start_queue_then_reject_with_nothing_created():
    pipeline = governed("web", policy())
    a, b, c = (services.trigger_build(pipeline) for _ in range(3))
    assert statuses(a, b, c) == ["RUNNING", "QUEUED", "QUEUED"]
    assert a.started_at is not None
    assert (b.started_at, b.enqueued_at is not None) == (None, True)
    assert JobRun.objects.filter(build=b, status="QUEUED").count() == 0  # nothing dispatched
    with pytest.raises(PipelineQueueFull) as full:
        services.trigger_build(pipeline)
    assert full.value.code == "PIPELINE_QUEUE_FULL"
    assert (full.value.fields["running"], full.value.fields["queued"]) == (1, 2)
    assert Build.objects.count() == 3
    pipeline.refresh_from_db()
    assert pipeline.last_build_number == 3  # the refused trigger's number was rolled back


@pytest.mark.django_db
def test_evict_oldest_cancels_the_oldest_queued_build():
    pipeline = governed("web", policy(on_queue_full="evict_oldest"))
    a, b, c = (services.trigger_build(pipeline) for _ in range(3))
    d = services.trigger_build(pipeline)
    assert statuses(a, b, c, d) == ["RUNNING", "CANCELED", "QUEUED", "QUEUED"]
    evicted = Build.objects.get(pk=b.pk)
    assert "evicted from the full queue" in evicted.reason
    assert f"build #{d.number}" in evicted.reason
    assert set(JobRun.objects.filter(build=b).values_list("status", flat=True)) == {"CANCELED"}


@pytest.mark.django_db
def test_queue_length_zero_with_evict_still_rejects():
    pipeline = governed("web", policy(queue_length=0, on_queue_full="evict_oldest"))
    services.trigger_build(pipeline)
    with pytest.raises(PipelineQueueFull):
        services.trigger_build(pipeline)


@pytest.mark.django_db
def test_rendered_keys_group_builds_across_pipelines():
    shared = policy(group_key="deploy-${BRANCH}", max_running=1, queue_length=5)
    with_branch = "variables: {BRANCH: main}\n" + PARALLEL
    web, api = governed("web", shared, with_branch), governed("api", shared, with_branch)
    a = services.trigger_build(web, {"BRANCH": "main"})
    b = services.trigger_build(api, {"BRANCH": "main"})
    c = services.trigger_build(api, {"BRANCH": "dev"})
    assert statuses(a, b, c) == ["RUNNING", "QUEUED", "RUNNING"]
    assert Build.objects.get(pk=b.pk).concurrency_group == "deploy-main"


@pytest.mark.django_db(transaction=True)
def test_a_finished_build_starts_the_next_queued_one_in_fifo_order():
    pipeline = governed("web", policy(queue_length=5))
    a, b, c = (services.trigger_build(pipeline) for _ in range(3))
    finish(a)
    assert statuses(a, b, c) == ["SUCCEEDED", "RUNNING", "QUEUED"]
    assert JobRun.objects.filter(build=b, stage_index=0, status="QUEUED").count() == 2
    finish(b, "FAILED")
    assert statuses(b, c) == ["FAILED", "RUNNING"]


@pytest.mark.django_db(transaction=True)
def test_raised_limits_apply_to_the_next_start_and_admission():
    pol = policy(queue_length=5)
    pipeline = governed("web", pol)
    a, b, c = (services.trigger_build(pipeline) for _ in range(3))
    ConcurrencyPolicy.objects.filter(pk=pol.pk).update(max_running=4)
    assert services.sweep_queues()["started"] == [b.pk, c.pk]
    assert services.trigger_build(pipeline).status == "RUNNING"
    ConcurrencyPolicy.objects.filter(pk=pol.pk).update(max_running=1)
    assert services.trigger_build(pipeline).status == "QUEUED"
    assert statuses(a) == ["RUNNING"]


@pytest.mark.django_db(transaction=True)
def test_cancel_in_progress_cancels_the_group_through_the_real_path():
    pipeline = governed("web", policy(cancel_in_progress=True, queue_length=5))
    a, b = services.trigger_build(pipeline), services.trigger_build(pipeline)
    c = services.trigger_build(pipeline)
    assert statuses(a, b, c) == ["CANCELLING", "CANCELED", "QUEUED"]
    assert "cancel in progress" in Build.objects.get(pk=b.pk).reason
    assert services.finish_cancel(a.pk) == "CANCELED"  # what the controller does next
    assert statuses(a, c) == ["CANCELED", "RUNNING"]


@pytest.mark.django_db
def test_queue_timeout_sweep_is_idempotent():
    pipeline = governed("web", policy(queue_timeout=60))
    a, b = services.trigger_build(pipeline), services.trigger_build(pipeline)
    assert services.sweep_queues()["timed_out"] == []
    with time_machine.travel(timezone.now() + timedelta(seconds=61), tick=False):
        assert services.sweep_queues()["timed_out"] == [b.pk]
        assert services.sweep_queues()["timed_out"] == []
    b.refresh_from_db()
    assert (b.status, b.finished_at is not None) == ("QUEUE_TIMEOUT", True)
    assert "queue_timeout (60 s)" in b.reason
    assert set(StepRun.objects.filter(job__build=b).values_list("status", flat=True)) == {"SKIPPED"}
    assert statuses(a) == ["RUNNING"]


@pytest.mark.django_db(transaction=True)
def test_the_concrete_case_step_retry_bypasses_a_full_queue():
    """max_running 1, queue_length 2: A runs (fast fails, slow goes on); B and C fill the
    queue; retrying A's failed step starts at once; B, C stay queued; D is still refused."""
    pipeline = governed("web", policy(max_running=1, queue_length=2, queue_timeout=60))
    a, b, c = (services.trigger_build(pipeline) for _ in range(3))
    step = fail_fast_job(a)
    retried = services.retry_step(a.pk, step.pk)
    assert (retried.status, retried.attempt) == ("PENDING", 2)
    job = JobRun.objects.get(build=a, key="fast")
    assert (job.status, job.attempt) == ("QUEUED", 2)  # dispatched again, on its retry queue
    assert statuses(a, b, c) == ["RUNNING", "QUEUED", "QUEUED"]
    with pytest.raises(PipelineQueueFull):
        services.trigger_build(pipeline)
    assert list(
        Build.objects.filter(status="QUEUED").order_by("enqueued_at").values_list("pk", flat=True)
    ) == [b.pk, c.pk]


@pytest.mark.django_db(transaction=True)
def test_the_concrete_case_with_evict_oldest():
    pipeline = governed("web", policy(max_running=1, queue_length=2, on_queue_full="evict_oldest"))
    a, b, c = (services.trigger_build(pipeline) for _ in range(3))
    services.retry_step(a.pk, fail_fast_job(a).pk)
    d = services.trigger_build(pipeline)
    assert statuses(a, b, c, d) == ["RUNNING", "CANCELED", "QUEUED", "QUEUED"]


@pytest.mark.django_db(transaction=True)
def test_step_retry_of_a_finished_build_waits_at_the_head_of_a_busy_group():
    pipeline = governed("web", policy(max_running=1, queue_length=1))
    a = services.trigger_build(pipeline)
    step = fail_fast_job(a)
    JobRun.objects.filter(build=a, key="slow").update(status="SUCCEEDED")
    assert services.advance_build(a.pk) == "FAILED"  # B, triggered next, takes the slot
    b, c = services.trigger_build(pipeline), services.trigger_build(pipeline)
    assert statuses(b, c) == ["RUNNING", "QUEUED"]  # the queue is full
    services.retry_step(a.pk, step.pk)  # never refused for queue length, evicts no one
    assert statuses(a, b, c) == ["QUEUED", "RUNNING", "QUEUED"]
    later = JobRun.objects.get(build=a, key="last")
    assert later.status == "PENDING"  # skipped when A failed, to run again now
    finish(b)
    assert statuses(a, c) == ["RUNNING", "QUEUED"]  # the retried build went first
    assert JobRun.objects.get(build=a, key="fast").status == "QUEUED"


@pytest.mark.django_db
def test_step_retry_refuses_what_it_cannot_retry():
    pipeline = make_pipeline("web", PARALLEL)
    a, b = services.trigger_build(pipeline), services.trigger_build(pipeline)
    pending = StepRun.objects.get(job__build=a, job__key="fast")
    with pytest.raises(StepNotRetryable) as refused:
        services.retry_step(a.pk, pending.pk)
    assert "is PENDING" in refused.value.detail
    with pytest.raises(StepNotFound):
        services.retry_step(b.pk, pending.pk)
    with pytest.raises(StepNotFound):
        services.retry_step(a.pk, 10**9)
    assert (StepRun.objects.get(pk=pending.pk).attempt, statuses(a)) == (1, ["RUNNING"])


@pytest.mark.django_db(transaction=True)
def test_evict_oldest_never_evicts_a_build_put_back_by_a_step_retry():
    pipeline = governed("web", policy(max_running=1, queue_length=2, on_queue_full="evict_oldest"))
    a = services.trigger_build(pipeline)
    step = fail_fast_job(a)
    JobRun.objects.filter(build=a, key="slow").update(status="SUCCEEDED")
    assert services.advance_build(a.pk) == "FAILED"
    b = services.trigger_build(pipeline)  # takes the slot
    services.retry_step(a.pk, step.pk)  # A waits at the head of the queue
    c = services.trigger_build(pipeline)
    assert statuses(a, b, c) == ["QUEUED", "RUNNING", "QUEUED"]
    d = services.trigger_build(pipeline)  # the queue is full: C goes, not A (older, retried)
    assert statuses(a, c, d) == ["QUEUED", "CANCELED", "QUEUED"]


@pytest.mark.django_db(transaction=True)
def test_a_build_cancelled_while_queued_holds_no_slot():
    pipeline = governed("web", policy(queue_length=5))
    a, b = services.trigger_build(pipeline), services.trigger_build(pipeline)
    assert services.request_cancel(b.pk) == "CANCELLING"  # the controller has not finished it
    finish(a)
    assert statuses(a, b) == ["SUCCEEDED", "CANCELLING"]
    assert services.trigger_build(pipeline).status == "RUNNING"


@pytest.mark.django_db(transaction=True)
def test_cancel_in_progress_works_without_a_queue():
    pipeline = governed("web", policy(cancel_in_progress=True, queue_length=0))
    a = services.trigger_build(pipeline)
    b = services.trigger_build(pipeline)  # replaces A: it waits for A to stop, not refused
    assert statuses(a, b) == ["CANCELLING", "QUEUED"]
    assert services.finish_cancel(a.pk) == "CANCELED"
    assert statuses(b) == ["RUNNING"]


@pytest.mark.django_db(transaction=True)
def test_builds_queued_by_a_deleted_policy_start_without_limit():
    pol = policy(queue_length=5)
    pipeline = governed("web", pol)
    a, b, c = (services.trigger_build(pipeline) for _ in range(3))
    pipeline.policy = None
    pipeline.save()
    pol.delete()
    assert services.sweep_queues()["started"] == [b.pk, c.pk]
    assert statuses(a, b, c) == ["RUNNING", "RUNNING", "RUNNING"]


@pytest.mark.django_db
def test_a_build_cancelled_in_the_queue_then_retried_holds_its_slot_while_cancelling():
    """It never started before; taken back to RUNNING by a step retry it holds a running
    slot, also once cancelled again (occupying() counts a CANCELLING build by its start)."""
    pipeline = governed("web", policy(max_running=1, queue_length=1))
    first = services.trigger_build(pipeline)
    waiting = services.trigger_build(pipeline)
    services.request_cancel(waiting.pk)
    services.finish_cancel(waiting.pk)  # nothing of it ran: CANCELED at once
    finish(first)
    step = StepRun.objects.filter(job__build=waiting).first()
    services.retry_step(waiting.pk, step.pk)
    assert statuses(waiting) == ["RUNNING"]
    assert services.request_cancel(waiting.pk) == "CANCELLING"  # its job still stopping
    newcomer = services.trigger_build(pipeline)
    assert statuses(waiting, newcomer) == ["CANCELLING", "QUEUED"]  # never two running
