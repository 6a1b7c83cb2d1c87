"""Artifacts on the server: uploaded whole or not at all by a running job attempt (its token),
given to the jobs that need its job, listed and downloaded by people who may read the build,
and expired; and the agent's collection of a job's files from its workspace."""

import hashlib
import io
import os
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from agents.process import artifacts as agent_artifacts
from artifacts import services
from artifacts.errors import ArtifactIncomplete, JobNotRunning
from artifacts.models import Artifact
from builds import services as builds
from builds.errors import InvalidPipeline
from builds.models import JobRun
from builds.statuses import RunStatus
from tests.support import client_for, running_job
from vault import tokens

pytestmark = pytest.mark.django_db

PIPELINE = """
stages:
  - name: build
    jobs:
      - id: make
        artifacts: {paths: [dist/*.whl], expire-in: 2d}
        steps: [{run: "true"}]
  - name: test
    jobs:
      - id: check
        steps: [{run: "true"}]
      - id: lint
        artifacts: false
        steps: [{run: "true"}]
"""


@pytest.fixture(autouse=True)
def storage_root(settings, tmp_path):
    root = tmp_path / "artifacts"
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(root)},
        },
    }
    return root


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def build():
    return builds.trigger_build(builds.save_pipeline("wheels", PIPELINE))


def agent_client(job: JobRun) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Job {tokens.for_attempt(job.pk, job.attempt)}")
    return client


def put(client, path: str, data: bytes, sha: str | None = None):
    return client.put(
        f"/api/agent/artifacts/upload/?path={path}",
        data=data,
        content_type="application/octet-stream",
        HTTP_X_ARTIFACT_SHA256=sha or hashlib.sha256(data).hexdigest(),
    )


WHEEL = b"PK\x03\x04 a wheel" * 1000


def test_an_upload_is_stored_whole_and_reaches_the_jobs_that_need_its_job(build, storage_root):
    make = running_job(build, "make")
    answer = put(agent_client(make), "dist/app-1.0-py3-none-any.whl", WHEEL)
    assert answer.status_code == 201, answer.content
    assert answer.json()["size"] == len(WHEEL)
    artifact = Artifact.objects.get()
    assert (artifact.path, artifact.attempt) == ("dist/app-1.0-py3-none-any.whl", 1)
    assert round((artifact.expires_at - artifact.created_at).total_seconds()) == 2 * 86400
    assert [p.read_bytes() for p in stored_files(storage_root)] == [WHEEL]
    JobRun.objects.filter(pk=make.pk).update(status=RunStatus.SUCCEEDED)
    check = agent_client(running_job(build, "check"))
    [listed] = check.get("/api/agent/artifacts/").json()
    assert (listed["job"], listed["sha256"]) == ("make", hashlib.sha256(WHEEL).hexdigest())
    got = check.get(f"/api/agent/artifacts/{listed['id']}/")
    assert b"".join(got.streaming_content) == WHEEL
    assert got["X-Artifact-Sha256"] == listed["sha256"]
    # `artifacts: false` takes none; a job of the same build that does not wait for it neither.
    lint = agent_client(running_job(build, "lint"))
    assert lint.get("/api/agent/artifacts/").json() == []
    assert lint.get(f"/api/agent/artifacts/{listed['id']}/").json()["code"] == "ARTIFACT_NOT_FOUND"


def test_an_upload_cut_half_way_or_not_matching_its_checksum_leaves_nothing(build, storage_root):
    make = running_job(build, "make")
    with pytest.raises(ArtifactIncomplete, match="after 9 of its 100 bytes"):
        services.receive(
            make.pk, make.attempt, "dist/a.whl", io.BytesIO(b"half way "), 100, "0" * 64
        )
    answer = put(agent_client(make), "dist/a.whl", WHEEL, sha="0" * 64)
    assert (answer.status_code, answer.json()["code"]) == (400, "ARTIFACT_CHECKSUM_MISMATCH")
    assert not Artifact.objects.exists()
    assert stored_files(storage_root) == []
    assert put(agent_client(make), "dist/a.whl", WHEEL).status_code == 201  # sent again: whole


def test_only_a_running_attempts_token_within_the_caps_may_upload(
    build, settings, storage_root, django_capture_on_commit_callbacks
):
    make = running_job(build, "make")
    client = agent_client(make)
    forged = APIClient()
    forged.credentials(HTTP_AUTHORIZATION=f"Job {make.pk}.{make.attempt}:forged")
    assert put(forged, "dist/a.whl", WHEEL).status_code == 401
    assert put(APIClient(), "dist/a.whl", WHEEL).status_code == 401
    for path in ("../escape", "/etc/passwd", "dist/../../x", "a//b"):
        answer = put(client, path, WHEEL)
        assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_ARTIFACT"), path
    settings.ARTIFACT_MAX_FILE_BYTES = 100
    answer = put(client, "dist/a.whl", WHEEL)
    assert (answer.status_code, answer.json()["code"]) == (413, "ARTIFACT_TOO_LARGE")
    assert "dist/a.whl: 12000 bytes, over the cap of 100 bytes per file" in answer.json()["detail"]
    settings.ARTIFACT_MAX_FILE_BYTES, settings.ARTIFACT_MAX_JOB_BYTES = 10**6, 20000
    assert put(client, "dist/a.whl", WHEEL).status_code == 201
    with django_capture_on_commit_callbacks(execute=True):  # the file it replaces goes
        assert put(client, "dist/a.whl", WHEEL).status_code == 201  # replaced: counted once
    answer = put(client, "dist/b.whl", WHEEL)
    assert (answer.status_code, answer.json()["code"]) == (413, "ARTIFACT_TOO_LARGE")
    assert "per job" in answer.json()["detail"]
    assert len(stored_files(storage_root)) == 1
    JobRun.objects.filter(pk=make.pk).update(status=RunStatus.SUCCEEDED)  # the attempt ended
    answer = put(client, "dist/c.whl", b"late")
    assert (answer.status_code, answer.json()["code"]) == (409, "JOB_NOT_RUNNING")
    with pytest.raises(JobNotRunning):
        services.running_attempt(make.pk, make.attempt)


def test_people_list_and_download_a_builds_artifacts_with_view_build(build, admin_client):
    make = running_job(build, "make")
    assert put(agent_client(make), "dist/app.whl", WHEEL).status_code == 201
    artifact = Artifact.objects.get()
    assert client_for().get(f"/api/builds/{build.pk}/artifacts/").status_code == 404  # unseen
    reader = client_for("builds.view_build")
    [listed] = reader.get(f"/api/builds/{build.pk}/artifacts/").json()
    assert (listed["path"], listed["size"]) == ("dist/app.whl", len(WHEEL))
    assert listed["expired"] is False
    got = reader.get(f"/api/builds/{build.pk}/artifacts/{artifact.pk}/")
    assert b"".join(got.streaming_content) == WHEEL
    assert reader.get(f"/api/builds/{build.pk + 1}/artifacts/{artifact.pk}/").status_code == 404
    assert reader.get(f"/api/builds/{build.pk + 1}/artifacts/").status_code == 404
    page = admin_client.get(f"/admin/builds/build/{build.pk}/change/").content.decode()
    assert "dist/app.whl" in page
    assert f"/admin/artifacts/artifact/{artifact.pk}/download/" in page
    got = admin_client.get(f"/admin/artifacts/artifact/{artifact.pk}/download/")
    assert b"".join(got.streaming_content) == WHEEL


def test_expiry_deletes_the_files_and_says_what_it_freed(
    build, storage_root, django_capture_on_commit_callbacks
):
    make = running_job(build, "make")
    for path in ("dist/old.whl", "dist/new.whl"):
        assert put(agent_client(make), path, WHEEL).status_code == 201
    Artifact.objects.filter(path="dist/old.whl").update(expires_at=timezone.now())
    out = io.StringIO()
    call_command("artifacts", "expire", "--dry-run", stdout=out)
    assert out.getvalue().strip() == "would free 1 artifacts, 12000 bytes"
    assert len(stored_files(storage_root)) == 2
    out = io.StringIO()
    with django_capture_on_commit_callbacks(execute=True):  # files go once the rows commit
        call_command("artifacts", "expire", stdout=out)
    assert out.getvalue().strip() == "freed 1 artifacts, 12000 bytes"
    assert len(stored_files(storage_root)) == 1
    old = Artifact.objects.get(path="dist/old.whl")
    assert old.expired_at is not None
    answer = client_for("builds.view_build").get(f"/api/builds/{build.pk}/artifacts/{old.pk}/")
    assert (answer.status_code, answer.json()["code"]) == (410, "ARTIFACT_EXPIRED")
    assert services.expire().files == 0  # nothing more is due


@pytest.mark.parametrize(
    ("artifacts", "error"),
    [
        ("{paths: [../up]}", "artifacts.paths: '../up': '..' would leave the workspace"),
        ("{paths: [/abs]}", "artifacts.paths: '/abs': a path relative to the workspace"),
        ("{paths: [a], expire-in: soon}", "artifacts.expire-in: 'soon' is not a duration"),
        ("{paths: [a], when: never}", "artifacts.when: Input should be"),
        ("true", "artifacts: a mapping (paths, when, expire-in, required), or false"),
    ],
)
def test_artifacts_in_the_yaml_are_checked(artifacts, error):
    with pytest.raises(InvalidPipeline) as raised:
        builds.save_pipeline("bad", PIPELINE.replace("false", artifacts))
    assert f"stages[1].jobs[1].{error}" in raised.value.detail


def test_the_agent_collects_what_the_globs_match_inside_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    for rel in ("dist/a.whl", "dist/b.tar.gz", "reports/x/unit.xml", "reports/top.txt", "src/m.py"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(rel)
    (ws / "dist" / "link.whl").symlink_to(ws / "src" / "m.py")  # inside: taken as that file
    found = agent_artifacts.collect(ws, ["dist/*.whl", "reports/**"], required=True)
    assert [f.path for f in found] == [
        "dist/a.whl", "dist/link.whl", "reports/top.txt", "reports/x/unit.xml",
    ]  # fmt: skip
    assert [f.path for f in agent_artifacts.collect(ws, ["reports"], False)] == [
        "reports/top.txt", "reports/x/unit.xml",
    ]  # fmt: skip
    assert agent_artifacts.collect(ws, ["**/*.py"], False)[0].path == "src/m.py"
    with pytest.raises(agent_artifacts.ArtifactError, match=r"^nothing/\*: matches nothing"):
        agent_artifacts.collect(ws, ["dist/*.whl", "nothing/*"], required=True)
    assert len(agent_artifacts.collect(ws, ["nothing/*"], required=False)) == 0
    (ws / "dist" / "shadow.whl").symlink_to("/etc/passwd")
    with pytest.raises(agent_artifacts.ArtifactError, match=r"^dist/shadow\.whl: a symbolic link"):
        agent_artifacts.collect(ws, ["dist/*.whl"], required=False)
    (ws / "dist" / "shadow.whl").unlink()
    (ws / "out").symlink_to("/etc")  # a folder link out: matched, refused; never walked
    with pytest.raises(agent_artifacts.ArtifactError, match=r"^out: a symbolic link out"):
        agent_artifacts.collect(ws, ["out"], required=False)
    assert [f.path for f in agent_artifacts.collect(ws, ["**/*.whl"], False)] == [
        "dist/a.whl", "dist/link.whl",
    ]  # fmt: skip


def test_a_download_never_writes_through_a_link_in_the_workspace(tmp_path):
    ws, elsewhere = tmp_path / "ws", tmp_path / "elsewhere"
    ws.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, ws / "dist")
    with pytest.raises(agent_artifacts.ArtifactError, match="'dist' in the workspace is not a"):
        agent_artifacts._place(ws, "dist/a.whl", None)
    os.symlink(elsewhere / "f", ws / "f")
    with pytest.raises(agent_artifacts.ArtifactError, match="as a link or a folder"):
        agent_artifacts._place(ws, "f", None)
    assert agent_artifacts._place(ws, "new/deep/a.whl", None) == ws / "new/deep/a.whl"
    assert (ws / "new/deep").is_dir()


def test_the_agent_checks_the_servers_caps_before_it_sends(tmp_path, settings):
    files = [agent_artifacts.Found(f"f{n}", tmp_path, 600) for n in range(3)]
    settings.ARTIFACT_MAX_FILE_BYTES, settings.ARTIFACT_MAX_JOB_BYTES = 500, 10**6
    with pytest.raises(agent_artifacts.ArtifactError, match=r"^f0: 600 bytes, over the cap"):
        agent_artifacts.check_caps(files)
    settings.ARTIFACT_MAX_FILE_BYTES, settings.ARTIFACT_MAX_FILES = 1000, 2
    with pytest.raises(agent_artifacts.ArtifactError, match=r"^f2: over the cap of 2 files"):
        agent_artifacts.check_caps(files)
    settings.ARTIFACT_MAX_FILES, settings.ARTIFACT_MAX_JOB_BYTES = 10, 1500
    with pytest.raises(agent_artifacts.ArtifactError, match=r"^f2: with the 1200 bytes before"):
        agent_artifacts.check_caps(files)
    settings.ARTIFACT_MAX_JOB_BYTES = 1800
    agent_artifacts.check_caps(files)  # exactly at the caps: taken
