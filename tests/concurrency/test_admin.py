"""The concurrency policy admin: validated limits, live counts, the groups of a policy with
their running builds and queue, and cancelling a queued build from there."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils import timezone

from builds import services
from builds.models import Build
from concurrency.models import ConcurrencyPolicy
from tests.builds.test_admin import parse_forms

DEFINITION = """\
variables: {BRANCH: main}
stages:
  - name: build
    jobs:
      - id: compile
        steps:
          - run: make
"""


@pytest.fixture
def policy(db):
    return ConcurrencyPolicy.objects.create(name="deploys", max_running=1, queue_length=5)


@pytest.fixture
def pipeline(policy):
    pipeline = services.save_pipeline("demo", DEFINITION)
    pipeline.policy = policy
    pipeline.save()
    return pipeline


@pytest.fixture
def builds(pipeline, admin_user):
    # trigger_build publishes on commit; the test transaction never commits.
    builds = [services.trigger_build(pipeline, user=admin_user) for _ in range(3)]
    assert [b.status for b in builds] == ["RUNNING", "QUEUED", "QUEUED"]
    return builds


def change_url(policy):
    return reverse("admin:concurrency_concurrencypolicy_change", args=(policy.pk,))


def cancel_url(policy, build):
    return reverse("admin:concurrency_concurrencypolicy_cancel_build", args=(policy.pk, build.pk))


def build_url(build):
    return reverse("admin:builds_build_change", args=(build.pk,))


def form_data(policy, **changes):
    data = {
        "name": policy.name,
        "group_key": policy.group_key,
        "max_running": policy.max_running,
        "queue_length": policy.queue_length,
        "queue_timeout": policy.queue_timeout,
        "on_queue_full": policy.on_queue_full,
    }
    if policy.cancel_in_progress:
        data["cancel_in_progress"] = "on"
    return {**data, **changes}


# Changelist and change page ---------------------------------------------------------------


def test_changelist_shows_limits_and_live_counts(admin_client, policy, builds):
    idle = ConcurrencyPolicy.objects.create(name="idle", queue_timeout=60)
    Build.objects.filter(pk=builds[0].pk).update(status="CANCELLING")  # still holds its slot
    response = admin_client.get(reverse("admin:concurrency_concurrencypolicy_changelist"))
    assert response.status_code == 200
    rows = {p.name: (p.running, p.queued) for p in response.context["cl"].result_list}
    assert rows == {"deploys": (1, 2), "idle": (0, 0)}
    assert "deploys" in response.text
    assert "${pipeline_id}" in response.text
    assert change_url(idle) in response.text

    # Finished builds are not counted.
    Build.objects.filter(pk=builds[0].pk).update(status="CANCELED")
    Build.objects.filter(pk=builds[1].pk).update(status="QUEUE_TIMEOUT")
    response = admin_client.get(
        reverse("admin:concurrency_concurrencypolicy_changelist"), {"o": "-9"}
    )
    assert [(p.name, p.running, p.queued) for p in response.context["cl"].result_list] == [
        ("deploys", 0, 1),
        ("idle", 0, 0),
    ]


def test_change_page_shows_each_group_with_its_queue(admin_client, policy, pipeline, builds):
    running, first, second = builds
    now = timezone.now()
    Build.objects.filter(pk=first.pk).update(enqueued_at=now - timedelta(minutes=3, seconds=5))
    Build.objects.filter(pk=second.pk).update(enqueued_at=now - timedelta(seconds=30))
    response = admin_client.get(change_url(policy))
    assert response.status_code == 200
    text = response.text
    overview = text[text.index('id="policy-groups"') :]
    assert f"group <code>{pipeline.pk}</code>" in overview
    assert "running 1 of at most 1; queued 2 of at most 5; a build waits at most 1h 00m 00s" in (
        overview
    )
    assert f'<a href="{build_url(running)}">demo #1</a> RUNNING' in overview
    # Queued builds in queue order, with how long they have waited.
    assert overview.index(build_url(first)) < overview.index(build_url(second))
    assert "3m 05s" in overview
    assert "30s" in overview
    # Each queued build has a Cancel form of its own, after the change form, never in it.
    forms = parse_forms(text)
    assert forms.actions.count(cancel_url(policy, first)) == 1
    assert forms.actions.count(cancel_url(policy, second)) == 1
    assert cancel_url(policy, running) not in text
    assert overview.count('name="csrfmiddlewaretoken"') == 2

    # A build put back at the head of the queue by a step retry is shown first.
    Build.objects.filter(pk=second.pk).update(queue_priority=1)
    overview = admin_client.get(change_url(policy)).text
    assert overview.index(build_url(second)) < overview.index(build_url(first))


def test_change_page_escapes_group_keys(admin_client, policy, pipeline):
    ConcurrencyPolicy.objects.filter(pk=policy.pk).update(group_key="deploy-${BRANCH}")
    services.trigger_build(pipeline, {"BRANCH": "<script>alert(1)</script>"})
    response = admin_client.get(change_url(policy))
    assert "deploy-&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "<script>alert(1)" not in response.text


def test_change_page_without_builds(admin_client, policy):
    response = admin_client.get(change_url(policy))
    assert response.status_code == 200
    assert "No build of this policy is running or queued." in response.text
    assert admin_client.get(reverse("admin:concurrency_concurrencypolicy_add")).status_code == 200


# Validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_running", "0", "Ensure this value is greater than or equal to 1."),
        ("max_running", "1001", "Ensure this value is less than or equal to 1000."),
        ("queue_length", "201", "Ensure this value is less than or equal to 200."),
        ("queue_length", "-1", "Ensure this value is greater than or equal to 0."),
        ("queue_timeout", "0", "Ensure this value is greater than or equal to 1."),
        ("queue_timeout", "86401", "Ensure this value is less than or equal to 86400."),
        ("max_running", "two", "Enter a whole number."),
        (
            "group_key",
            "deploy-${",
            "use ${NAME} placeholders, NAME made of letters, digits and _",
        ),
        (
            "group_key",
            "deploy-${1x}",
            "use ${NAME} placeholders, NAME made of letters, digits and _",
        ),
    ],
)
def test_invalid_limits_are_shown_and_nothing_is_saved(admin_client, policy, field, value, message):
    before = ConcurrencyPolicy.objects.values().get(pk=policy.pk)
    response = admin_client.post(
        change_url(policy), form_data(policy, name="renamed", **{field: value})
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors == {field: [message]}
    assert "Please correct the error below." in response.text
    assert message in response.text
    assert ConcurrencyPolicy.objects.values().get(pk=policy.pk) == before

    response = admin_client.post(
        reverse("admin:concurrency_concurrencypolicy_add"),
        form_data(policy, name="new", **{field: value}),
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {field: [message]}
    assert not ConcurrencyPolicy.objects.filter(name="new").exists()


def test_valid_limits_are_saved(admin_client, policy):
    data = form_data(
        policy,
        group_key="deploy-${BRANCH}",
        max_running="1000",
        queue_length="0",
        queue_timeout="86400",
        on_queue_full="evict_oldest",
        cancel_in_progress="on",
    )
    response = admin_client.post(change_url(policy), data)
    assert response.status_code == 302
    policy.refresh_from_db()
    assert (policy.group_key, policy.max_running, policy.queue_length) == (
        "deploy-${BRANCH}",
        1000,
        0,
    )
    assert (policy.queue_timeout, policy.on_queue_full, policy.cancel_in_progress) == (
        86400,
        "evict_oldest",
        True,
    )


def test_number_inputs_carry_the_limits(admin_client, policy):
    form = admin_client.get(change_url(policy)).context["adminform"].form
    limits = {
        name: (form.fields[name].widget.attrs["min"], form.fields[name].widget.attrs["max"])
        for name in ("max_running", "queue_length", "queue_timeout")
    }
    assert limits == {
        "max_running": (1, 1000),
        "queue_length": (0, 200),
        "queue_timeout": (1, 86400),
    }


# Cancelling a queued build ----------------------------------------------------------------


def test_cancel_a_queued_build(admin_client, policy, builds):
    queued = builds[1]
    response = admin_client.post(cancel_url(policy, queued), follow=True)
    assert response.redirect_chain == [(change_url(policy), 302)]
    assert f"Build {queued}: CANCELLING" in response.text
    # The rest of the cancel happens on the controller.
    assert Build.objects.get(pk=queued.pk).status == "CANCELLING"
    assert Build.objects.get(pk=builds[2].pk).status == "QUEUED"

    # A second click reports the service's answer for a finished build.
    Build.objects.filter(pk=queued.pk).update(status="CANCELED")
    response = admin_client.post(cancel_url(policy, queued), follow=True)
    assert f"Build {queued}: BUILD_ALREADY_FINISHED" in response.text


def test_cancel_is_post_only_needs_the_permission_and_the_policy(
    client, admin_client, policy, pipeline, builds
):
    queued = builds[1]
    assert admin_client.get(cancel_url(policy, queued)).status_code == 405
    other = ConcurrencyPolicy.objects.create(name="other")
    assert admin_client.post(cancel_url(other, queued)).status_code == 404

    operator = User.objects.create_user("operator", password="pw", is_staff=True)
    operator.user_permissions.add(Permission.objects.get(codename="view_concurrencypolicy"))
    client.force_login(operator)
    page = client.get(change_url(policy))
    assert page.status_code == 200
    assert build_url(queued) in page.text
    assert cancel_url(policy, queued) not in page.text
    # Neither hints that the build exists: its pipeline is not one the operator sees.
    assert client.post(cancel_url(policy, queued)).status_code == 404
    assert client.post(cancel_url(other, queued)).status_code == 404
    assert Build.objects.get(pk=queued.pk).status == "QUEUED"

    client.post(reverse("admin:logout"))
    assert client.post(cancel_url(policy, queued)).status_code == 302  # to the login page
    assert Build.objects.get(pk=queued.pk).status == "QUEUED"
