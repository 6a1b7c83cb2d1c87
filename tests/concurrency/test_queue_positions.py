"""A queued build's place in its group's queue and its estimated start
(concurrency.services.queue_positions): positions in the order admission starts builds
(priorities, FIFO, ties, a step retry at the head), moving up as builds leave, estimates from
the history of the pipelines' durations or null without it, and the cost in queries."""

from datetime import timedelta

import pytest
from django.utils import timezone

from builds import services
from builds.models import Build, JobRun
from builds.services.progress import start_queued_builds
from concurrency import services as concurrency
from concurrency.models import ConcurrencyPolicy
from concurrency.services import queue_place, queue_places
from concurrency.services.queue_positions import HISTORY, QueuePlace, group_queue, group_queues
from tests.concurrency.test_admission import finish, governed, policy
from tests.support import PARALLEL, fail_fast_job

pytestmark = pytest.mark.django_db

PRIORITIES = "priority: 1\nmax-priority: 9\n" + PARALLEL.lstrip()
# Today (the variable partitions, which a step retry needs, are made around it), frozen by
# the `clock` fixture (conftest).
NOW = timezone.now().replace(microsecond=0)
MINUTE = timedelta(minutes=1)


def history(pipeline, *minutes: float, status: str = "SUCCEEDED") -> None:
    """Finished builds of `pipeline` that took `minutes` each, the last one the newest, as
    the controller leaves them (numbered after the pipeline's builds so far)."""
    first = pipeline.last_build_number + 1
    for number, took in enumerate(minutes, start=first):
        started = NOW - timedelta(days=1) + number * MINUTE
        Build.objects.create(
            pipeline=pipeline,
            number=number,
            status=status,
            spec=pipeline.spec,
            created_at=started,
            started_at=started,
            finished_at=started + took * MINUTE,
        )
    pipeline.last_build_number = first + len(minutes) - 1
    pipeline.save(update_fields=["last_build_number"])


def started(build, ago: timedelta) -> None:
    Build.objects.filter(pk=build.pk).update(started_at=NOW - ago)


def places(*builds) -> list[tuple[int, int] | None]:
    """(position, of) of each build, asked one build at a time."""
    answers = [queue_place(Build.objects.get(pk=b.pk)) for b in builds]
    return [(a.position, a.of) if a else None for a in answers]


def starts(*builds) -> list[timedelta | None]:
    """When each build is expected to start, from now."""
    answers = [queue_place(Build.objects.get(pk=b.pk)) for b in builds]
    return [a.estimated_start - NOW if a.estimated_start else None for a in answers]


def order(group: str) -> list[int]:
    return [waiting.build.pk for waiting in group_queue(group).queued]


# Positions -----------------------------------------------------------------------------


def test_positions_follow_priorities_then_fifo_then_the_id(clock):
    pipeline = governed("web", policy(queue_length=10), PRIORITIES)
    running = services.trigger_build(pipeline)
    low = services.trigger_build(pipeline, priority=0)
    clock.shift(1)
    high = services.trigger_build(pipeline, priority=5)
    clock.shift(1)
    default = services.trigger_build(pipeline)  # the pipeline's priority, 1
    clock.shift(1)
    high_later = services.trigger_build(pipeline, priority=5)
    # Queued at the same instant as `high_later`, with a higher id: the id breaks the tie.
    tie = services.trigger_build(pipeline, priority=5)
    assert places(running) == [None]
    assert places(high, high_later, tie, default, low) == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    # FIFO is by the time each was queued, not by id (a retried build queues again, last).
    Build.objects.filter(pk=high.pk).update(enqueued_at=NOW + 10 * MINUTE)
    assert places(high_later, tie, high) == [(1, 5), (2, 5), (3, 5)]


def test_positions_are_the_order_admission_starts_builds_in(clock):
    pol = policy(queue_length=10)
    pipeline = governed("web", pol, PRIORITIES)
    running = services.trigger_build(pipeline)
    queued = []
    for priority in (0, 5, None, 5, 9, 1, 0):
        queued.append(services.trigger_build(pipeline, priority=priority))
        clock.shift(1)
    group = running.concurrency_group
    expected = order(group)
    assert sorted(expected) == sorted(b.pk for b in queued)
    # With room for all of them, admission would start them in exactly this order...
    ConcurrencyPolicy.objects.filter(pk=pol.pk).update(max_running=len(queued) + 1)
    assert concurrency.builds_to_start(group) == expected
    # ... and one slot at a time, the build that starts is always position 1, and everyone
    # behind it moves up by one.
    ConcurrencyPolicy.objects.filter(pk=pol.pk).update(max_running=1)
    ended = running
    while expected:
        finish(ended)
        assert start_queued_builds(group) == [expected[0]]  # what finish_build's commit does
        ended, expected = Build.objects.get(pk=expected[0]), expected[1:]
        assert order(group) == expected
        now_queued = [queue_place(b) for b in Build.objects.filter(pk__in=expected)]
        assert sorted(p.position for p in now_queued) == list(range(1, len(expected) + 1))
        assert {p.of for p in now_queued} <= {len(expected)}


def test_a_step_retry_waits_at_the_head_before_every_priority(clock):
    pipeline = governed("web", policy(queue_length=5), PRIORITIES)
    a = services.trigger_build(pipeline, priority=0)
    step = fail_fast_job(a)
    JobRun.objects.filter(build=a, key="slow").update(status="SUCCEEDED")
    assert services.advance_build(a.pk) == "FAILED"
    b = services.trigger_build(pipeline)  # takes the slot
    urgent = services.trigger_build(pipeline, priority=9)
    clock.shift(60)
    services.retry_step(a.pk, step.pk)  # queued after `urgent`, and yet ahead of it
    assert [Build.objects.get(pk=x.pk).status for x in (a, b, urgent)] == [
        "QUEUED",
        "RUNNING",
        "QUEUED",
    ]
    assert places(a, urgent) == [(1, 2), (2, 2)]
    finish(b)
    assert start_queued_builds(a.concurrency_group) == [a.pk]
    assert places(a, urgent) == [None, (1, 1)]


def test_a_build_leaving_the_queue_moves_the_others_up(clock):
    pipeline = governed("web", policy(queue_length=5))
    running = services.trigger_build(pipeline)
    first, second, third, fourth = (services.trigger_build(pipeline) for _ in range(4))
    assert places(first, second, third, fourth) == [(1, 4), (2, 4), (3, 4), (4, 4)]
    services.request_cancel(second.pk)  # cancelled while queued: it leaves the queue
    assert places(first, second, third, fourth) == [(1, 3), None, (2, 3), (3, 3)]
    services.finish_build(Build.objects.get(pk=first.pk), "QUEUE_TIMEOUT")
    assert places(first, third, fourth) == [None, (1, 2), (2, 2)]
    finish(running)
    assert start_queued_builds(running.concurrency_group) == [third.pk]
    assert places(third, fourth) == [None, (1, 1)]


def test_groups_are_apart_and_a_build_outside_any_queue_has_no_place(clock):
    shared = policy(group_key="deploy-${BRANCH}", queue_length=5)
    with_branch = "variables: {BRANCH: main}\n" + PARALLEL
    web, api = governed("web", shared, with_branch), governed("api", shared, with_branch)
    services.trigger_build(web, {"BRANCH": "main"})
    main_queued = services.trigger_build(api, {"BRANCH": "main"})  # other pipeline, same group
    services.trigger_build(api, {"BRANCH": "dev"})
    dev_queued = services.trigger_build(web, {"BRANCH": "dev"})
    assert places(main_queued, dev_queued) == [(1, 1), (1, 1)]
    free = services.trigger_build(services.save_pipeline("free", PARALLEL))  # no policy
    assert places(free) == [None]
    assert group_queues([]) == {}
    assert group_queue("nobody").queued == []


# Estimated start ------------------------------------------------------------------------


def test_the_estimate_simulates_the_slots_with_the_pipelines_median_durations(clock):
    shared = policy(group_key="deploys", max_running=2, queue_length=10)
    slow, fast = governed("slow", shared), governed("fast", shared)
    # slow: the median of its last 20 successful builds is 10 min (older ones, failed ones
    # and the builds still running are not counted).
    history(slow, *[90] * 5)  # older than the last 20: out of the window
    history(slow, *[8, 40] * 9, 10, 10)  # a mean would be 22.6
    history(slow, 1, 1, 1, status="FAILED")
    history(fast, 3, 5)  # an even count: the mean of the two middle ones, 4 min
    r1, r2 = services.trigger_build(slow), services.trigger_build(fast)
    q1, q2, q3 = (services.trigger_build(p) for p in (slow, fast, slow))
    started(r1, 2 * MINUTE)  # ends in 8 min
    started(r2, 1 * MINUTE)  # ends in 3 min
    # q1 takes r2's slot at 3 min (until 13), q2 r1's at 8 (until 12), q3 q2's at 12.
    assert starts(q1, q2, q3) == [3 * MINUTE, 8 * MINUTE, 12 * MINUTE]
    queue = group_queue("deploys")
    assert queue.limit == 2
    assert [(r.build.pk, r.expected_end - NOW) for r in queue.running] == [
        (r1.pk, 8 * MINUTE),
        (r2.pk, 3 * MINUTE),
    ]
    assert [w.place for w in queue.queued] == [
        QueuePlace(1, 3, NOW + 3 * MINUTE),
        QueuePlace(2, 3, NOW + 8 * MINUTE),
        QueuePlace(3, 3, NOW + 12 * MINUTE),
    ]
    assert HISTORY == 20


def test_the_estimate_moves_with_time_and_overrunning_and_cancelling_builds(clock):
    pipeline = governed("web", policy(queue_length=5))
    history(pipeline, 10)
    running = services.trigger_build(pipeline)
    first, second = services.trigger_build(pipeline), services.trigger_build(pipeline)
    assert starts(first, second) == [10 * MINUTE, 20 * MINUTE]
    started(running, 25 * MINUTE)  # past its median: expected to end any moment
    assert starts(first, second) == [timedelta(0), 10 * MINUTE]
    started(running, 5 * MINUTE)
    Build.objects.filter(pk=running.pk).update(status="CANCELLING")  # it still holds its slot
    assert starts(first, second) == [timedelta(0), 10 * MINUTE]


def test_without_history_the_estimate_is_null_rather_than_a_guess(clock):
    shared = policy(group_key="deploys", max_running=2, queue_length=10)
    known, new = governed("known", shared), governed("new", shared)
    history(known, 10)
    r_known, r_new = services.trigger_build(known), services.trigger_build(new)
    q_new, q_known = services.trigger_build(new), services.trigger_build(known)
    # r_known frees its slot at 10 min; r_new has no history, so its slot never frees in the
    # estimate, nor does q_new's once it has taken r_known's: q_known cannot be estimated.
    assert starts(q_new, q_known) == [10 * MINUTE, None]
    queue = group_queue("deploys")
    assert [(r.build.pk, r.expected_end) for r in queue.running] == [
        (r_known.pk, NOW + 10 * MINUTE),
        (r_new.pk, None),
    ]
    assert queue.queued[1].place == QueuePlace(2, 2, None)
    # Nothing of the group has history: nothing is estimated at all.
    only_new = governed("alone", policy(name="alone", queue_length=5))
    services.trigger_build(only_new)
    waiting = services.trigger_build(only_new)
    assert starts(waiting) == [None]
    assert places(waiting) == [(1, 1)]


def test_the_limit_is_the_head_policys_as_admission_counts_it(clock):
    pol = policy(max_running=2, queue_length=5)
    pipeline = governed("web", pol)
    history(pipeline, 10)
    a, b = services.trigger_build(pipeline), services.trigger_build(pipeline)
    queued = services.trigger_build(pipeline)
    started(a, 6 * MINUTE)
    started(b, 2 * MINUTE)
    assert starts(queued) == [4 * MINUTE]  # a's slot
    # Lowered to 1: both must end before anyone starts.
    ConcurrencyPolicy.objects.filter(pk=pol.pk).update(max_running=1)
    assert starts(queued) == [8 * MINUTE]
    # Raised: a slot is free now (the next start or sweep takes it).
    ConcurrencyPolicy.objects.filter(pk=pol.pk).update(max_running=3)
    assert starts(queued) == [timedelta(0)]
    # The head's policy deleted: the group has no limit any more, as for builds_to_start.
    Build.objects.filter(pk=queued.pk).update(policy=None)
    assert starts(queued) == [timedelta(0)]
    assert group_queue(queued.concurrency_group).limit is None


# Cost -----------------------------------------------------------------------------------


def test_a_whole_group_or_a_list_of_builds_costs_three_queries(
    clock, django_assert_max_num_queries, django_assert_num_queries
):
    shared = policy(group_key="g-${BRANCH}", max_running=2, queue_length=50)
    with_branch = "variables: {BRANCH: x}\n" + PARALLEL
    pipelines = [governed(f"p{i}", shared, with_branch) for i in range(4)]
    for pipeline in pipelines[:3]:
        history(pipeline, 5, 7, 9)
    builds = [
        services.trigger_build(pipeline, {"BRANCH": branch})
        for branch in ("a", "b", "c")
        for pipeline in pipelines
        for _ in range(3)
    ]
    builds = list(Build.objects.filter(pk__in=[b.pk for b in builds]))
    with django_assert_max_num_queries(3):
        queue = group_queue("g-a")
    assert len(queue.running) == 2
    assert len(queue.queued) == 10
    with django_assert_max_num_queries(3):
        answers = queue_places(builds)
    assert len(answers) == 30  # 10 queued in each of the 3 groups
    assert {(p.position, p.of) for p in answers.values()} == {(i, 10) for i in range(1, 11)}
    with django_assert_max_num_queries(3):
        every = group_queues(["g-a", "g-b", "g-c"])
    assert [len(q.queued) for q in every.values()] == [10, 10, 10]
    # What the pages show of each build is loaded with it: no query per build afterwards.
    with django_assert_num_queries(0):
        shown = [(str(w.build), w.build.priority, w.build.enqueued_at) for w in queue.queued]
        shown += [(str(r.build), r.build.status, r.build.started_at) for r in queue.running]
        assert queue.queued[0].build.policy.max_running == 2
    assert len(shown) == 12
    running = next(b for b in builds if b.status == "RUNNING")
    with django_assert_num_queries(0):  # not queued: nothing to ask
        assert queue_place(running) is None
