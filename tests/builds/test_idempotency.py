"""Idempotent triggers: the same trigger sent again with its Idempotency-Key (a client retrying
after a lost answer, a form sent twice) gets the build the first one made, through the
service, the API, the admin's Trigger page and the CLI; never a second build."""

import threading
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.urls import reverse

from builds import services
from builds.errors import IdempotencyKeyReused, InvalidIdempotencyKey
from builds.models import Build
from concurrency.errors import PipelineQueueFull
from concurrency.models import ConcurrencyPolicy
from tests.support import PARALLEL, client_for, make_pipeline

KEY = "0b5c6f3e-6a4e-4f3a-9a43-2b8f0d1c7e11"
DEFINITION = "variables: {A: '0'}\n" + PARALLEL


@pytest.fixture
def pipeline(db):
    return make_pipeline("idem", DEFINITION)


def test_the_same_key_returns_the_first_build_and_takes_no_number(pipeline):
    first = services.trigger(pipeline, {"A": "1"}, idempotency_key=KEY)
    again = services.trigger(pipeline, {"A": 1}, idempotency_key=KEY)  # normalized alike
    assert (again.build.pk, again.replayed, first.replayed) == (first.build.pk, True, False)
    assert services.trigger_build(pipeline, {"A": "1"}).number == 2  # no number lost
    other = make_pipeline("other", DEFINITION)  # a key is the pipeline's own
    assert services.trigger_build(other, {"A": "1"}, idempotency_key=KEY).number == 1


def test_the_key_with_other_variables_is_refused_and_changes_nothing(pipeline):
    first = services.trigger_build(pipeline, {"A": "1"}, idempotency_key=KEY)
    with pytest.raises(IdempotencyKeyReused) as reused:
        services.trigger_build(pipeline, {"A": "2"}, idempotency_key=KEY)
    assert reused.value.fields == {"build": first.pk, "number": 1}
    assert list(Build.objects.values_list("pk", flat=True)) == [first.pk]


@pytest.mark.parametrize("key", ["with space", "x" * 201, "clé", "tab\there", "\n"])
def test_a_bad_key_is_refused_before_anything_is_stored(pipeline, key):
    with pytest.raises(InvalidIdempotencyKey):
        services.trigger_build(pipeline, {}, idempotency_key=key)
    assert not Build.objects.exists()


def test_a_refused_trigger_stores_no_key(pipeline):
    """PIPELINE_QUEUE_FULL stores nothing, so the same key is a new trigger once there is room."""
    pipeline.policy = ConcurrencyPolicy.objects.create(name="p", max_running=1, queue_length=0)
    pipeline.save()
    running = services.trigger_build(pipeline, {})
    with pytest.raises(PipelineQueueFull):
        services.trigger_build(pipeline, {}, idempotency_key=KEY)
    Build.objects.filter(pk=running.pk).update(status="SUCCEEDED")
    assert services.trigger(pipeline, {}, idempotency_key=KEY).replayed is False


@pytest.mark.django_db(transaction=True)
def test_concurrent_triggers_with_one_key_make_one_build():
    pipeline = make_pipeline("race", DEFINITION)
    results, start = [], threading.Barrier(4)

    def trigger():
        start.wait()
        try:
            results.append(services.trigger_build(pipeline, {}, idempotency_key=KEY).pk)
        finally:
            connection.close()

    threads = [threading.Thread(target=trigger) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert (len(results), len(set(results))) == (4, 1)
    assert Build.objects.count() == 1


def test_api_answers_201_then_200_replayed_and_409_for_other_variables(pipeline):
    api = client_for("builds.add_build")
    url = f"/api/pipelines/{pipeline.pk}/builds/"

    def post(variables, key=KEY):
        return api.post(url, {"variables": variables}, format="json", HTTP_IDEMPOTENCY_KEY=key)

    first, again = post({"A": "1"}), post({"A": "1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert (first.get("Idempotent-Replayed"), again["Idempotent-Replayed"]) == (None, "true")
    reused = post({"A": "2"})
    assert (reused.status_code, reused.json()["code"]) == (409, "IDEMPOTENCY_KEY_REUSED")
    bad = post({}, key="two words")
    assert (bad.status_code, bad.json()["code"]) == (400, "INVALID_IDEMPOTENCY_KEY")
    assert Build.objects.count() == 1


def test_the_admin_form_sent_twice_makes_one_build(admin_client, pipeline):
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    page = admin_client.get(url)
    key = page.context["form"].initial["idempotency_key"]
    assert f'name="idempotency_key" value="{key}"' in page.text  # a new key with each form
    form = {"idempotency_key": key, "variables": "A=1"}
    first, again = admin_client.post(url, form), admin_client.post(url, form, follow=True)
    build = Build.objects.get()
    assert first.url == again.redirect_chain[-1][0]
    assert "was triggered by this form already" in again.text
    # Sent back with other variables: told so, and given a new key for a new build.
    changed = admin_client.post(url, {**form, "variables": "A=2"})
    assert "already triggered build #1 with other variables" in changed.text
    assert changed.context["form"].initial["idempotency_key"] not in ("", key)
    assert list(Build.objects.all()) == [build]


def test_the_cli_run_twice_with_a_key_reports_the_first_build(pipeline):
    def run():
        out = StringIO()
        call_command("trigger", "idem", "--idempotency-key", KEY, stdout=out)
        return out.getvalue()

    first = run()
    assert first == f"build #1 (id {Build.objects.get().pk}) RUNNING\n"
    assert run() == first.replace("RUNNING", "RUNNING (made earlier with this idempotency key)")
    assert Build.objects.count() == 1
