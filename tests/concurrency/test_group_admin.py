"""The admin's page of one concurrency group: its running builds with their expected ends,
its queue in order with each build's position and estimated start; read only, for whoever
may see the policies, at a cost that does not grow with the queue."""

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from builds import services
from concurrency.models import ConcurrencyGroup
from tests.concurrency.test_admission import governed, policy
from tests.concurrency.test_queue_positions import MINUTE, NOW, history, started
from tests.support import PARALLEL

pytestmark = pytest.mark.django_db


def page_url(key: str) -> str:
    group = ConcurrencyGroup.objects.get(key=key)
    return reverse("admin:concurrency_concurrencygroup_change", args=(group.pk,))


def build_url(build) -> str:
    return reverse("admin:builds_build_change", args=(build.pk,))


def rows(text: str, table: str) -> list[list[str]]:
    """The cells of a table of the page, as text."""
    body = text[text.index(f'id="{table}"') :]
    body = body[: body.index("</table>")]
    return [
        [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)
        if "<td>" in row
    ]


def at(delta) -> str:
    return (NOW + delta).strftime("%Y-%m-%d %H:%M:%S UTC")


@pytest.fixture
def group(clock):
    """deploys: `known` (10 min of history) running 4 min; queued: a step retry of a `new`
    build (no history), then `known` builds of priorities 5 and 0, then `new` again."""
    shared = policy(group_key="deploys", max_running=1, queue_length=20)
    known = governed("known", shared, "max-priority: 9\n" + PARALLEL.lstrip())
    new = governed("new", shared)
    history(known, 10)
    running = services.trigger_build(known)
    started(running, 4 * MINUTE)
    low = services.trigger_build(known, priority=0)
    retried = services.trigger_build(new)
    high = services.trigger_build(known, priority=5)
    last = services.trigger_build(new)
    type(retried).objects.filter(pk=retried.pk).update(queue_priority=1)  # as a step retry
    return {"running": running, "queued": [retried, high, low, last], "known": known}


def test_the_group_page_lists_running_and_queued_builds_in_order(admin_client, group):
    response = admin_client.get(page_url("deploys"))
    assert response.status_code == 200
    text = response.text
    overview = text[text.index('id="group-queue"') :]
    policy_url = reverse(
        "admin:concurrency_concurrencypolicy_change", args=(group["known"].policy_id,)
    )
    assert (
        f'running 1 of at most 1 (policy <a href="{policy_url}">p</a>, of the build at the head'
        " of the queue); queued 4"
    ) in overview
    running = group["running"]
    assert rows(text, "group-running") == [
        [str(running), "RUNNING", at(-4 * MINUTE), f"{at(6 * MINUTE)} (in 6m 00s)"]
    ]
    assert f'<a href="{build_url(running)}">' in overview
    retried, high, low, last = group["queued"]
    # The step retry first, whatever the priorities; then 5, then 0 and the last, FIFO.
    # `retried` has no history: it starts at 6 min and its slot never frees in the estimate.
    assert rows(text, "group-queued") == [
        [
            "1",
            str(retried),
            "step retry (ahead of every priority)",
            "0s",
            f"{at(6 * MINUTE)} (in 6m 00s)",
        ],
        ["2", str(high), "5", "0s", "unknown: no history"],
        ["3", str(low), "0", "0s", "unknown: no history"],
        ["4", str(last), "0", "0s", "unknown: no history"],
    ]
    for build in group["queued"]:
        assert f'<a href="{build_url(build)}">' in overview


def test_the_group_page_estimates_each_start_with_history(admin_client, clock):
    pipeline = governed("web", policy(group_key="solo", queue_length=5))
    history(pipeline, 10)
    running = services.trigger_build(pipeline)
    started(running, 25 * MINUTE)  # overrunning: expected to end now
    queued = [services.trigger_build(pipeline) for _ in range(2)]
    clock.shift(65)
    text = admin_client.get(page_url("solo")).text
    now = timedelta(seconds=65)
    assert rows(text, "group-running")[0][3] == f"{at(now)} (now)"
    assert rows(text, "group-queued") == [
        ["1", str(queued[0]), "0", "1m 05s", f"{at(now)} (now)"],
        ["2", str(queued[1]), "0", "1m 05s", f"{at(now + 10 * MINUTE)} (in 10m 00s)"],
    ]


def test_an_idle_group_and_the_list_of_groups(admin_client, group):
    services.save_pipeline("quiet", PARALLEL)
    ConcurrencyGroup.objects.create(key="idle")
    text = admin_client.get(page_url("idle")).text
    overview = text[text.index('id="group-queue"') :]
    assert "running 0; queued 0" in overview
    assert overview.count("<p>none</p>") == 2
    listed = admin_client.get(reverse("admin:concurrency_concurrencygroup_changelist"))
    counts = {g.key: (g.running, g.queued) for g in listed.context["cl"].result_list}
    assert counts == {"deploys": (1, 4), "idle": (0, 0)}
    assert page_url("deploys") in listed.text


def test_the_group_page_escapes_the_key(admin_client, clock):
    shared = policy(group_key="deploy-${BRANCH}", queue_length=5)
    pipeline = governed("web", shared, "variables: {BRANCH: main}\n" + PARALLEL)
    services.trigger_build(pipeline, {"BRANCH": "<script>alert(1)</script>"})
    text = admin_client.get(page_url("deploy-<script>alert(1)</script>")).text
    assert "deploy-&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)" not in text


def test_read_only_for_whoever_may_see_the_policies(client, admin_client, group):
    url = page_url("deploys")
    for codename in ("view_concurrencypolicy", "change_concurrencypolicy", "view_concurrencygroup"):
        user = User.objects.create_user(codename, is_staff=True)
        user.user_permissions.add(Permission.objects.get(codename=codename))
        client.force_login(user)
        assert client.get(url).status_code == 200
        assert (
            client.get(reverse("admin:concurrency_concurrencygroup_changelist")).status_code == 200
        )
    client.force_login(User.objects.create_user("nobody", is_staff=True))
    assert client.get(url).status_code == 403
    viewer = User.objects.create_user("builds", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_build"))
    client.force_login(viewer)
    assert client.get(url).status_code == 403
    # Nobody adds, changes or deletes a group: admission makes them.
    key = ConcurrencyGroup.objects.get(key="deploys")
    assert admin_client.get(reverse("admin:concurrency_concurrencygroup_add")).status_code == 403
    assert admin_client.post(url, {"key": "other"}).status_code == 403
    delete = reverse("admin:concurrency_concurrencygroup_delete", args=(key.pk,))
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert ConcurrencyGroup.objects.get(pk=key.pk).key == "deploys"


def page_queries(client, url) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_the_page_costs_the_same_whatever_the_length_of_the_queue(admin_client, group):
    url = page_url("deploys")
    few = page_queries(admin_client, url)
    for _ in range(5):
        services.trigger_build(group["known"])
        services.trigger_build(group["known"], priority=3)
    assert page_queries(admin_client, url) == few
    assert few <= 7  # the session, the user, the group; the queue (3); one to spare
