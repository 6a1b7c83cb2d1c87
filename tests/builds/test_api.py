"""The REST API: auth, permissions, validation and error codes. These tests never commit,
so no message reaches a worker; tests/integration runs builds for real."""

import logging

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from builds import services
from builds.models import Build, BuildVariable, JobRun, Pipeline, StepLogChunk, StepRun
from builds.statuses import BuildStatus
from tests.support import client_for

DEFINITION = """
variables:
  GREETING: hello
stages:
  - name: build
    jobs:
      - id: compile
        steps:
          - name: say
            run: echo "$GREETING"
  - name: test
    jobs:
      - {id: unit, steps: [{run: "true"}, {run: "true"}]}
      - {id: lint, steps: [{run: "true"}]}
"""


ALL = (
    "builds.add_pipeline",
    "builds.change_pipeline",
    "builds.view_pipeline",
    "builds.add_build",
    "builds.view_build",
)


@pytest.fixture
def api(db):
    return client_for(*ALL)


@pytest.fixture
def pipeline(db):
    return services.save_pipeline("web", DEFINITION)


def test_anonymous_gets_401_with_a_code(db):
    response = APIClient().get("/api/pipelines/")
    assert response.status_code == 401
    assert response.json()["code"] == "NOT_AUTHENTICATED"
    response = APIClient().post("/api/pipelines/1/builds/", {}, format="json")
    assert response.status_code == 401


def test_bad_token_gets_401(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token nope")
    assert client.get("/api/builds/").status_code == 401


@pytest.mark.parametrize(
    ("perms", "method", "path", "body"),
    [
        (("builds.view_pipeline",), "post", "/api/pipelines/", {"name": "x", "definition": "x"}),
        (("builds.view_pipeline",), "post", "/api/pipelines/{id}/builds/", {}),
        (
            ("builds.view_pipeline",),
            "put",
            "/api/pipelines/{id}/",
            {"name": "x", "definition": "x"},
        ),
    ],
)
def test_missing_permission_gets_403(pipeline, perms, method, path, body):
    client = client_for(*perms)
    response = getattr(client, method)(path.format(id=pipeline.pk), body, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "PERMISSION_DENIED"
    assert Build.objects.count() == 0
    assert Pipeline.objects.get().name == "web"


@pytest.mark.parametrize("path", ["/api/pipelines/", "/api/builds/"])
def test_lists_show_nothing_to_who_may_see_nothing(pipeline, path):
    services.trigger_build(pipeline)
    response = client_for().get(path)
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_create_and_update_pipeline(api):
    response = api.post("/api/pipelines/", {"name": "web", "definition": DEFINITION}, format="json")
    assert response.status_code == 201, response.json()
    pipeline = Pipeline.objects.get(pk=response.json()["id"])
    assert pipeline.spec["variables"] == {"GREETING": "hello"}
    changed = DEFINITION.replace("hello", "bonjour")
    response = api.put(
        f"/api/pipelines/{pipeline.pk}/", {"name": "web", "definition": changed}, format="json"
    )
    assert response.status_code == 200
    pipeline.refresh_from_db()
    assert pipeline.spec["variables"] == {"GREETING": "bonjour"}
    assert api.get(f"/api/pipelines/{pipeline.pk}/").json()["definition"] == changed


def test_invalid_definition_is_refused_and_nothing_stored(api):
    bad = DEFINITION.replace("run: echo", "rnu: echo")
    response = api.post("/api/pipelines/", {"name": "web", "definition": bad}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "INVALID_PIPELINE"
    assert "stages[0].jobs[0].steps[0].rnu: unknown key" in body["detail"]
    assert Pipeline.objects.count() == 0


def test_invalid_update_changes_nothing(api, pipeline):
    response = api.put(
        f"/api/pipelines/{pipeline.pk}/", {"name": "web", "definition": "stages: ["}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_PIPELINE"
    pipeline.refresh_from_db()
    assert pipeline.definition == DEFINITION


def test_duplicate_and_bad_names(api, pipeline):
    response = api.post("/api/pipelines/", {"name": "web", "definition": DEFINITION}, format="json")
    assert (response.status_code, response.json()["code"]) == (409, "PIPELINE_NAME_TAKEN")
    response = api.post("/api/pipelines/", {"name": "a b", "definition": DEFINITION}, format="json")
    assert (response.status_code, response.json()["code"]) == (400, "INVALID_PIPELINE")
    response = api.post("/api/pipelines/", {"definition": DEFINITION}, format="json")
    assert (response.status_code, response.json()["code"]) == (400, "INVALID_REQUEST")
    assert Pipeline.objects.count() == 1


def test_trigger_creates_the_status_tree(api, pipeline):
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/", {"variables": {"GREETING": "x"}}, format="json"
    )
    assert response.status_code == 201
    created = response.json()
    assert (created["number"], created["status"]) == (1, "RUNNING")
    detail = api.get(f"/api/builds/{created['id']}/").json()
    assert detail["variables"] == {"GREETING": "x"}
    assert [s["name"] for s in detail["stages"]] == ["build", "test"]
    assert [s["status"] for s in detail["stages"]] == ["QUEUED", "PENDING"]
    compile_job = detail["stages"][0]["jobs"][0]
    assert (compile_job["key"], compile_job["status"]) == ("compile", "QUEUED")
    order = ("needs", "condition", "matrix_of", "matrix")
    assert [compile_job[key] for key in order] == [None, "", "", None]
    assert compile_job["steps"][0] | {"id": 0} == {
        "id": 0,
        "name": "say",
        "status": "PENDING",
        "attempt": 1,
        "exit_code": None,
        "reason": "",
        "started_at": None,
        "finished_at": None,
        "condition": "",
        "timeout": 3600,
        "max_retries": 0,
        "retry_rule": None,
        "max_processes": None,
        "max_memory": None,
        "kill_grace": None,
    }
    assert [len(j["steps"]) for j in detail["stages"][1]["jobs"]] == [2, 1]
    second = api.post(f"/api/pipelines/{pipeline.pk}/builds/", {}, format="json").json()
    assert second["number"] == 2
    listed = api.get(f"/api/pipelines/{pipeline.pk}/builds/").json()
    assert [b["number"] for b in listed["results"]] == [2, 1]


def test_trigger_overrides_defaults(api, pipeline):
    build_id = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/",
        {"variables": {"GREETING": 3}},
        format="json",
    ).json()["id"]
    variables = {
        v.name: (v.value, v.source) for v in BuildVariable.objects.filter(build_id=build_id)
    }
    assert variables == {"GREETING": ("3", "trigger")}


@pytest.mark.parametrize(
    "variables",
    [
        {"bad name": "x"},
        {"A": {"nested": 1}},
        {"A": None},
        {"CI_BUILD_ID": "1"},
        ["A"],
        "A=1",
        7,
        True,
        [],
        "",
        0,
        False,
    ],
)
def test_bad_variables_are_refused_and_nothing_stored(api, pipeline, variables):
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/", {"variables": variables}, format="json"
    )
    assert (response.status_code, response.json()["code"]) == (400, "INVALID_VARIABLES")
    assert Build.objects.count() == JobRun.objects.count() == BuildVariable.objects.count() == 0
    pipeline.refresh_from_db()
    assert pipeline.last_build_number == 0


def test_step_log_is_plain_text(api, pipeline):
    build = services.trigger_build(pipeline)
    step = StepRun.objects.filter(job__build=build).first()
    StepLogChunk.objects.create(step=step, attempt=1, seq=0, text="hello\n")
    StepLogChunk.objects.create(step=step, attempt=1, seq=1, text="world\n")
    StepLogChunk.objects.create(step=step, attempt=2, seq=0, text="second\n")
    StepRun.objects.filter(pk=step.pk).update(attempt=2)
    response = api.get(f"/api/builds/{build.pk}/steps/{step.pk}/log/")
    assert response["Content-Type"].startswith("text/plain")
    assert response.content == b"second\n"
    response = api.get(f"/api/builds/{build.pk}/steps/{step.pk}/log/?attempt=1")
    assert response.content == b"hello\nworld\n"
    other = services.trigger_build(pipeline)
    response = api.get(f"/api/builds/{other.pk}/steps/{step.pk}/log/")
    assert (response.status_code, response.json()["code"]) == (404, "NOT_FOUND")


def test_unknown_build_is_404_with_code(api):
    response = api.get("/api/builds/999999/")
    assert (response.status_code, response.json()["code"]) == (404, "NOT_FOUND")


def test_openapi_schema(api):
    response = api.get("/api/schema/?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/api/pipelines/{id}/builds/" in paths
    assert "/api/builds/{id}/steps/{step_id}/log/" in paths


def nothing_triggered(pipeline) -> bool:
    pipeline.refresh_from_db()
    return pipeline.last_build_number == 0 and Build.objects.count() == 0


def test_deeply_nested_json_is_a_parse_error(api, pipeline):
    # About 200 KB: the json module runs out of stack (RecursionError) long before that.
    body = b'{"variables": {"A": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/", body, content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json() == {
        "code": "PARSE_ERROR",
        "detail": "JSON parse error - nested too deeply",
    }
    assert nothing_triggered(pipeline)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"variables": ', "application/json", 400, "PARSE_ERROR"),
        (b'{"variables": {"A": NaN}}', "application/json", 400, "PARSE_ERROR"),
        (b"\xff\xfe", "application/json", 400, "PARSE_ERROR"),
        (b'{"variables": {}}', "application/json; charset=bz2_codec", 400, "PARSE_ERROR"),
        (b"variables=1", "text/plain", 415, "UNSUPPORTED_MEDIA_TYPE"),
        # The API takes JSON only: form bodies would escape the body size limit.
        (b"variables=1", "application/x-www-form-urlencoded", 415, "UNSUPPORTED_MEDIA_TYPE"),
    ],
)
def test_unreadable_body_is_refused_with_a_code(api, pipeline, body, content_type, status, code):
    response = api.post(f"/api/pipelines/{pipeline.pk}/builds/", body, content_type=content_type)
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert nothing_triggered(pipeline)


@pytest.mark.parametrize(
    "path",
    [
        "/api/builds/abc/",
        "/api/builds/abc/steps/1/log/",
        "/api/builds/1/steps/abc/log/",
        "/api/pipelines/abc/builds/",
        "/api/agents/abc/",
        "/api/builds/99999999999999999999999/",
        "/api/builds/1%0A2/",  # a newline in the path (found by tests/faults schemathesis)
        "/api/nope/",
    ],
)
def test_bad_ids_and_unknown_paths_are_404_with_code(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert response.json() == {"code": "NOT_FOUND", "detail": "Not found."}


def padded(size: int) -> bytes:
    """A valid trigger body of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = b'{"variables": {}}'
    return body + b" " * (size - len(body))


def test_body_at_the_limit_is_accepted(api, pipeline):
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/",
        padded(settings.API_MAX_BODY_BYTES),
        content_type="application/json",
    )
    assert response.status_code == 201


# Just past our limit (our parser refuses it), and past Django's DATA_UPLOAD_MAX_MEMORY_SIZE
# (request.body refuses it before the parser runs).
@pytest.mark.parametrize("extra", [1, 2 * 1024 * 1024])
def test_oversized_body_is_413_and_changes_nothing(api, pipeline, extra):
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/",
        padded(settings.API_MAX_BODY_BYTES + extra),
        content_type="application/json",
    )
    assert (response.status_code, response.json()["code"]) == (413, "REQUEST_TOO_LARGE")
    assert nothing_triggered(pipeline)


def test_null_variables_are_none(api, pipeline):
    response = api.post(f"/api/pipelines/{pipeline.pk}/builds/", {"variables": None}, format="json")
    assert response.status_code == 201
    assert set(BuildVariable.objects.values_list("source", flat=True)) == {"pipeline"}


def test_unexpected_error_is_500_json_and_logged(api, pipeline, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(services, "trigger", broken)
    with caplog.at_level(logging.ERROR, logger="ciproject.api"):
        response = api.post(f"/api/pipelines/{pipeline.pk}/builds/", {}, format="json")
    assert response.status_code == 500
    assert response.json() == {
        "code": "INTERNAL_ERROR",
        "detail": "an unexpected error; it has been logged",
    }
    assert b"secret" not in response.content
    [record] = [r for r in caplog.records if r.name == "ciproject.api"]
    assert isinstance(record.exc_info[1], RuntimeError)


def test_limit_is_capped(api, pipeline):
    now = timezone.now()
    Build.objects.bulk_create(
        Build(pipeline=pipeline, number=n, status=BuildStatus.SUCCEEDED, spec={}, created_at=now)
        for n in range(1, 502)
    )
    body = api.get("/api/builds/?limit=100000").json()
    assert body["count"] == 501
    assert len(body["results"]) == 500
    assert "limit=500" in body["next"]
