"""The REST API: auth, permissions, validation and error codes. These tests never commit,
so no message reaches a worker; tests/integration runs builds for real."""

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from builds import services
from builds.models import Build, BuildVariable, JobRun, Pipeline, StepLogChunk, StepRun

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


def client_for(*perms: str) -> APIClient:
    user = User.objects.create_user(f"user{User.objects.count()}")
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


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
        ((), "get", "/api/pipelines/", None),
        (("builds.view_pipeline",), "post", "/api/pipelines/", {"name": "x", "definition": "x"}),
        (("builds.view_pipeline",), "post", "/api/pipelines/{id}/builds/", {}),
        (("builds.view_pipeline",), "get", "/api/builds/", None),
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
        f"/api/pipelines/{pipeline.pk}/builds/", {"variables": {"EXTRA": "x"}}, format="json"
    )
    assert response.status_code == 201
    created = response.json()
    assert (created["number"], created["status"]) == (1, "RUNNING")
    detail = api.get(f"/api/builds/{created['id']}/").json()
    assert detail["variables"] == {"GREETING": "hello", "EXTRA": "x"}
    assert [s["name"] for s in detail["stages"]] == ["build", "test"]
    assert [s["status"] for s in detail["stages"]] == ["QUEUED", "PENDING"]
    compile_job = detail["stages"][0]["jobs"][0]
    assert (compile_job["key"], compile_job["status"]) == ("compile", "QUEUED")
    assert compile_job["steps"][0] | {"id": 0} == {
        "id": 0,
        "name": "say",
        "status": "PENDING",
        "attempt": 1,
        "exit_code": None,
        "started_at": None,
        "finished_at": None,
    }
    assert [len(j["steps"]) for j in detail["stages"][1]["jobs"]] == [2, 1]
    second = api.post(f"/api/pipelines/{pipeline.pk}/builds/", {}, format="json").json()
    assert second["number"] == 2
    listed = api.get(f"/api/pipelines/{pipeline.pk}/builds/").json()
    assert [b["number"] for b in listed["results"]] == [2, 1]


def test_trigger_overrides_defaults(api, pipeline):
    build_id = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/",
        {"variables": {"GREETING": "hi", "N": 3}},
        format="json",
    ).json()["id"]
    variables = {
        v.name: (v.value, v.source) for v in BuildVariable.objects.filter(build_id=build_id)
    }
    assert variables == {"GREETING": ("hi", "trigger"), "N": ("3", "trigger")}


@pytest.mark.parametrize(
    "variables",
    [{"bad name": "x"}, {"A": {"nested": 1}}, {"A": None}, {"CI_BUILD_ID": "1"}, ["A"], "A=1"],
)
def test_bad_variables_are_refused_and_nothing_stored(api, pipeline, variables):
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/", {"variables": variables}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["code"] in {"INVALID_VARIABLES", "INVALID_REQUEST"}
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
