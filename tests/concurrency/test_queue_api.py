"""The API's `queue` of a build: {"position", "of", "estimated_start"} while QUEUED, else
null, in a build's page and in the lists of builds, whose cost does not grow with the number
of builds listed."""

from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from builds import services
from builds.models import Build
from tests.concurrency.test_admission import governed, policy
from tests.concurrency.test_queue_positions import MINUTE, NOW, history, started
from tests.support import PARALLEL, client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    return client_for("builds.view_build", "builds.add_build")


def when(answer: dict) -> timedelta | None:
    start = answer["queue"]["estimated_start"]
    return None if start is None else datetime.fromisoformat(start) - NOW


def test_a_queued_build_shows_its_place_and_estimated_start(api, clock):
    shared = policy(group_key="deploys", max_running=1, queue_length=5)
    known, new = governed("known", shared), governed("new", shared)
    history(known, 10)
    running = services.trigger_build(known)
    started(running, 4 * MINUTE)
    first, second = services.trigger_build(known), services.trigger_build(new)
    third = services.trigger_build(known)

    answer = api.get(f"/api/builds/{first.pk}/").json()
    assert answer["status"] == "QUEUED"
    assert answer["queue"] == {
        "position": 1,
        "of": 3,
        "estimated_start": (NOW + 6 * MINUTE).isoformat().replace("+00:00", "Z"),
    }
    second_answer = api.get(f"/api/builds/{second.pk}/").json()
    assert (second_answer["queue"]["position"], when(second_answer)) == (2, 16 * MINUTE)
    # `second`'s pipeline has no history: nothing behind it can be estimated.
    assert api.get(f"/api/builds/{third.pk}/").json()["queue"] == {
        "position": 3,
        "of": 3,
        "estimated_start": None,
    }
    assert api.get(f"/api/builds/{running.pk}/").json()["queue"] is None

    # The lists carry it too: every build, and a pipeline's.
    listed = {b["id"]: b["queue"] for b in api.get("/api/builds/").json()["results"]}
    assert listed[running.pk] is None
    assert [listed[b.pk]["position"] for b in (first, second, third)] == [1, 2, 3]
    assert listed[first.pk]["estimated_start"] is not None
    of_pipeline = api.get(f"/api/pipelines/{known.pk}/builds/").json()["results"]
    assert {b["id"]: b["queue"] and b["queue"]["position"] for b in of_pipeline} == {
        third.pk: 3,
        first.pk: 1,
        running.pk: None,
        **{b.pk: None for b in Build.objects.filter(pipeline=known, status="SUCCEEDED")},
    }

    # A trigger that queues answers with the new build's place.
    created = api.post(f"/api/pipelines/{new.pk}/builds/", {}, format="json").json()
    assert (created["status"], created["queue"]["position"], created["queue"]["of"]) == (
        "QUEUED",
        4,
        4,
    )

    # Once it runs, it has no place; those behind it move up.
    Build.objects.filter(pk=running.pk).update(status="SUCCEEDED", finished_at=NOW)
    services.start_queued_builds("deploys")
    assert api.get(f"/api/builds/{first.pk}/").json()["queue"] is None
    assert api.get(f"/api/builds/{second.pk}/").json()["queue"]["position"] == 1


def test_a_build_without_a_policy_has_no_queue(api):
    build = services.trigger_build(services.save_pipeline("free", PARALLEL))
    assert api.get(f"/api/builds/{build.pk}/").json()["queue"] is None


def list_queries(api, path: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = api.get(path)
    assert response.status_code == 200
    return len(queries)


def test_the_lists_cost_the_same_whatever_the_number_of_queued_builds(
    api, clock, django_assert_max_num_queries
):
    shared = policy(group_key="g-${BRANCH}", max_running=1, queue_length=50)
    with_branch = "variables: {BRANCH: x}\n" + PARALLEL
    web, other = governed("web", shared, with_branch), governed("other", shared, with_branch)
    history(web, 5)
    services.trigger_build(web, {"BRANCH": "a"})
    services.trigger_build(web, {"BRANCH": "a"})
    api.get("/api/builds/")  # the token's first use writes its last_used_at: not compared
    few = (list_queries(api, "/api/builds/"), list_queries(api, f"/api/pipelines/{web.pk}/builds/"))
    for branch in ("a", "b", "c", "d"):
        for pipeline in (web, other):
            for _ in range(5):
                services.trigger_build(pipeline, {"BRANCH": branch})
    assert Build.objects.filter(status="QUEUED").count() == 38  # 11 in group a, 9 in b, c, d
    # The token, its pipelines and the permissions (4), the count, the page, then the queue:
    # the queued builds, the running builds, the medians.
    with django_assert_max_num_queries(9):
        listed = api.get("/api/builds/").json()["results"]
    assert sum(b["queue"] is not None for b in listed) == 38
    with django_assert_max_num_queries(10):  # and the pipeline
        api.get(f"/api/pipelines/{web.pk}/builds/")
    assert few == (
        list_queries(api, "/api/builds/"),
        list_queries(api, f"/api/pipelines/{web.pk}/builds/"),
    )
    queued = Build.objects.filter(status="QUEUED").first()
    # The token, its pipelines and the permissions, the build, its jobs, steps and
    # variables; the queue.
    with django_assert_max_num_queries(11):
        api.get(f"/api/builds/{queued.pk}/")


def test_the_schema_documents_the_queue(api):
    schema = api.get("/api/schema/?format=json").json()["components"]["schemas"]
    queue = schema["BuildSummary"]["properties"]["queue"]
    assert queue.get("nullable") or {"type": "null"} in queue.get("oneOf", [])
    assert set(schema["Queue"]["properties"]) == {"position", "of", "estimated_start"}
