"""Cancellation on the database: the request's single compare-and-set, the batched part,
and the cancel winning over a step that ends in the same instant."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db.models.functions import Now

from agents.models import Agent
from builds import services
from builds.errors import BuildAlreadyFinished
from builds.models import Build, JobRun, StepRun
from builds.services import cancellation
from builds.statuses import BuildStatus, RunStatus
from concurrency.models import ConcurrencyPolicy
from dispatch import messages
from tests.support import make_pipeline


def pipeline_with_jobs(name: str, jobs: int):
    lines = "".join(f"      - {{id: j{i}, steps: [{{run: 'true'}}]}}\n" for i in range(jobs))
    return make_pipeline(name, f"stages:\n  - name: s\n    jobs:\n{lines}")


@pytest.mark.django_db
def test_cancel_request_cost_does_not_grow_with_the_build(django_assert_max_num_queries):
    small = services.trigger_build(pipeline_with_jobs("small", 1))
    large = services.trigger_build(pipeline_with_jobs("large", 200))
    user = User.objects.create_user("u")
    for build in (small, large):
        with django_assert_max_num_queries(3):  # savepoint, UPDATE, release
            assert services.request_cancel(build.pk, user) == "CANCELLING"
    large.refresh_from_db()
    assert (large.status, large.cancel_requested_by) == ("CANCELLING", user)
    assert large.cancel_requested_at is not None
    # The request touched only the build row: the jobs wait for the batched part.
    assert JobRun.objects.filter(build=large, status="QUEUED").count() == 200


@pytest.mark.django_db
def test_a_second_cancel_forces_a_third_changes_nothing_and_finished_builds_refuse():
    build = services.trigger_build(pipeline_with_jobs("p", 1))
    services.request_cancel(build.pk)
    first = Build.objects.get(pk=build.pk).cancel_requested_at
    assert Build.objects.get(pk=build.pk).cancel_forced_at is None
    assert services.request_cancel(build.pk) == "CANCELLING"
    forced = Build.objects.get(pk=build.pk).cancel_forced_at
    assert forced is not None
    assert services.request_cancel(build.pk) == "CANCELLING"
    assert Build.objects.values_list("cancel_requested_at", "cancel_forced_at").get(
        pk=build.pk
    ) == (first, forced)
    done = services.trigger_build(pipeline_with_jobs("q", 1))
    Build.objects.filter(pk=done.pk).update(status=BuildStatus.SUCCEEDED)
    with pytest.raises(BuildAlreadyFinished) as refused:
        services.request_cancel(done.pk)
    assert refused.value.code == "BUILD_ALREADY_FINISHED"
    assert Build.objects.get(pk=done.pk).status == "SUCCEEDED"


@pytest.mark.django_db
def test_finish_cancel_ends_what_never_started_in_bulk():
    build = services.trigger_build(pipeline_with_jobs("p", 5))
    services.request_cancel(build.pk)
    assert services.finish_cancel(build.pk) == "CANCELED"
    build.refresh_from_db()
    assert build.status == "CANCELED"
    assert build.finished_at is not None
    assert set(JobRun.objects.filter(build=build).values_list("status", flat=True)) == {"CANCELED"}
    assert set(StepRun.objects.filter(job__build=build).values_list("status", flat=True)) == {
        "CANCELED"
    }
    assert services.finish_cancel(build.pk) is None  # idempotent


NOTIFY = """
stages:
  - name: s
    jobs:
      - {id: work, steps: [{run: 'true'}]}
  - name: t
    jobs:
      - {id: notify, if: 'always()', cleanup-timeout: 30, steps: [{run: 'true'}]}
"""


@pytest.mark.django_db
def test_a_job_that_holds_after_the_cancel_is_queued_with_its_deadline():
    build = services.trigger_build(make_pipeline("notified", NOTIFY))
    services.request_cancel(build.pk)
    assert services.finish_cancel(build.pk) == "CANCELLING"  # `notify` runs now
    jobs = {job.key: job for job in JobRun.objects.filter(build=build)}
    assert (jobs["work"].status, jobs["notify"].status) == ("CANCELED", "QUEUED")
    left = (jobs["notify"].cleanup_deadline - jobs["notify"].queued_at).total_seconds()
    assert 29 < left <= 31
    # An agent may start it, the build being cancelled: it is one that runs after the cancel.
    started = services.start_job(jobs["notify"].pk, jobs["notify"].attempt, "a1")
    assert started.status == "RUNNING"
    assert 0 < started.cleanup_left.total_seconds() <= 30
    assert services.finish_job(started, RunStatus.SUCCEEDED, after_cancel=True)
    assert services.advance_build(build.pk) == "CANCELED"
    assert JobRun.objects.get(pk=started.pk).status == "SUCCEEDED"  # its own ending


@pytest.mark.django_db
def test_a_forced_cancel_or_one_of_a_build_its_queue_held_runs_nothing_more():
    forced = services.trigger_build(make_pipeline("forced", NOTIFY))
    services.request_cancel(forced.pk)
    services.request_cancel(forced.pk)
    governed = make_pipeline("governed", NOTIFY)
    governed.policy = ConcurrencyPolicy.objects.create(name="one", max_running=1, queue_length=1)
    governed.save()
    running, queued = services.trigger_build(governed), services.trigger_build(governed)
    assert (running.status, queued.status) == ("RUNNING", "QUEUED")
    services.request_cancel(queued.pk)  # no slot: its always() job must not run
    assert Build.objects.get(pk=queued.pk).cancelled_from == "QUEUED"
    for build in (forced, queued):
        assert services.finish_cancel(build.pk) == "CANCELED"
        assert set(JobRun.objects.filter(build=build).values_list("status", flat=True)) == {
            "CANCELED"
        }


@pytest.mark.django_db
def test_a_step_ending_just_after_the_cancel_is_canceled():
    build = services.trigger_build(
        make_pipeline(
            "p",
            "stages:\n  - name: a\n    jobs:\n      - {id: j, steps: [{run: x}, {run: y}]}\n"
            "  - name: b\n    jobs:\n      - {id: k, steps: [{run: z}]}\n",
        )
    )
    job = services.start_job(JobRun.objects.get(build=build, key="j").pk, 1, "agent")
    first, second = job.steps.order_by("index")
    first.job = job
    assert services.start_step(first)
    services.request_cancel(build.pk)
    # The step exits 0 in the instant after the cancel: the cancel wins.
    assert services.finish_step(first, 1, RunStatus.SUCCEEDED, 0, {"V": "x"}) == "CANCELED"
    assert services.build_variables(build.pk) == {}
    second.job = job
    assert not services.start_step(second)  # nothing new starts in a cancelling build
    assert services.finish_job(job, RunStatus.SUCCEEDED)
    assert JobRun.objects.get(pk=job.pk).status == "CANCELED"
    assert services.advance_build(build.pk) == "CANCELED"
    later = JobRun.objects.get(build=build, key="k")
    assert (later.status, later.started_at) == ("CANCELED", None)


@pytest.mark.django_db
def test_watchdog_forces_a_cancel_the_agent_never_confirmed(settings):
    watchdog_timing(settings)
    Agent.objects.create(name="gone", labels=["default"])
    build = services.trigger_build(pipeline_with_jobs("p", 2))
    job = services.start_job(JobRun.objects.filter(build=build).first().pk, 1, "gone")
    step = job.steps.get()
    step.job = job
    services.start_step(step)
    services.request_cancel(build.pk)
    assert services.cancel_watchdog() == []  # the normal path gets its chance first
    requested_ago(build, 5)
    assert services.cancel_watchdog() == []  # re-driven; the agent may still be running it
    assert Build.objects.get(pk=build.pk).status == "CANCELLING"
    statuses = dict(JobRun.objects.filter(build=build).values_list("pk", "status"))
    assert statuses.pop(job.pk) == "RUNNING"  # waits for its agent
    assert list(statuses.values()) == ["CANCELED"]  # the re-drive ended what never started
    requested_ago(build, 39)  # heartbeat 5 + lost after 30 + margin 5 = 40
    assert services.cancel_watchdog() == []
    requested_ago(build, 41)
    assert services.cancel_watchdog() == [build.pk]
    build.refresh_from_db()
    assert build.status == "CANCELED"
    job.refresh_from_db()
    assert job.status == "CANCELED"
    assert "did not confirm" in job.reason
    assert "agent gone did not confirm" in services.step_log(step)
    agent = Agent.objects.get(name="gone")
    assert agent.suspect_since is not None
    assert f"build {build.pk}" in agent.suspect_reason


def watchdog_timing(settings):
    settings.AGENT_HEARTBEAT_SECONDS = 5
    settings.AGENT_OFFLINE_AFTER_SECONDS = 30
    settings.CANCEL_WATCHDOG_MARGIN_SECONDS = 5


def requested_ago(build, seconds: float) -> None:
    """As if the build's cancel had been asked for `seconds` ago (by the database's clock,
    which the watchdog reads)."""
    Build.objects.filter(pk=build.pk).update(cancel_requested_at=Now() - timedelta(seconds=seconds))


def cancelling_on_gone_agent(settings, name="p"):
    """A build cancelled 41 s ago while its job runs on an agent that never confirmed."""
    watchdog_timing(settings)
    Agent.objects.get_or_create(name="gone", defaults={"labels": ["default"]})
    build = services.trigger_build(pipeline_with_jobs(name, 1))
    job = services.start_job(JobRun.objects.get(build=build).pk, 1, "gone")
    services.request_cancel(build.pk)
    requested_ago(build, 41)
    return build, job


@pytest.mark.django_db
def test_the_watchdog_tells_the_agent_again_when_it_forces_a_cancel(settings, monkeypatch):
    build, job = cancelling_on_gone_agent(settings)
    stops = []
    monkeypatch.setattr(messages, "stop_job", lambda *args: stops.append(args))
    assert services.cancel_watchdog() == [build.pk]
    assert stops == [(job.pk, 1, "gone")]  # a cut-off agent hears it once it is back


@pytest.mark.django_db
def test_the_watchdog_rechecks_a_build_under_its_lock(settings, monkeypatch):
    """The watchdog lists the stalled cancels, then forces each: a build that moved on in
    between (its cancel finished, a retry runs its job again) is left alone."""
    build, job = cancelling_on_gone_agent(settings)
    force = cancellation._force_cancel

    def after_a_retry(*args, **kwargs):
        Build.objects.filter(pk=build.pk).update(status="RUNNING", cancel_requested_at=None)
        JobRun.objects.filter(pk=job.pk).update(attempt=2, agent="other")
        return force(*args, **kwargs)

    monkeypatch.setattr(cancellation, "_force_cancel", after_a_retry)
    assert services.cancel_watchdog() == []
    job.refresh_from_db()
    assert (job.status, job.attempt, job.reason) == ("RUNNING", 2, "")
    assert Build.objects.get(pk=build.pk).status == "RUNNING"
    assert Agent.objects.get(name="gone").suspect_since is None


@pytest.mark.django_db
def test_the_watchdog_waits_for_a_cleanup_and_a_longer_kill_grace(settings):
    build, job = cancelling_on_gone_agent(settings)  # 41 s ago: overdue by 1 s
    settings.STEP_KILL_GRACE_SECONDS = 10
    JobRun.objects.filter(pk=job.pk).update(cleanup_deadline=Now() + timedelta(seconds=60))
    assert services.cancel_watchdog() == []  # its cleanup may run for another minute
    JobRun.objects.filter(pk=job.pk).update(cleanup_deadline=None)
    job.steps.update(status="RUNNING", kill_grace=20)  # 10 s more than the agent's
    assert services.cancel_watchdog() == []
    requested_ago(build, 51)  # 51 > 40 + 10
    assert services.cancel_watchdog() == [build.pk]


@pytest.mark.django_db
def test_a_retried_build_is_cancelled_afresh_not_forced_again():
    build = services.trigger_build(pipeline_with_jobs("p", 1))
    services.request_cancel(build.pk)
    services.request_cancel(build.pk)  # forced
    cancellation.finish_cancel(build.pk)  # nothing ran: it ends at once
    assert Build.objects.get(pk=build.pk).status == "CANCELED"
    services.retry_build(build.pk)
    assert Build.objects.get(pk=build.pk).cancel_forced_at is None
    services.request_cancel(build.pk)
    assert Build.objects.get(pk=build.pk).cancel_forced_at is None  # a first cancel again
