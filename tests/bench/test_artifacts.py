"""Artifact throughput (`make bench`): a 200 MB file uploaded by the agent's client
(agents.process.artifacts.Client) for a running job attempt, through a real gunicorn web on
loopback into the filesystem storage, then downloaded by a running job of a later stage
that needs it, its sha256 checked. Prints MB/s for each, against a raw copy of the same
file on the same disk (shutil.copyfile, the reference, same run). Target: >= 100 MB/s."""

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from agents.process import artifacts as agent_artifacts
from artifacts.models import Artifact
from builds import services
from builds.models import JobRun
from builds.statuses import RunStatus
from tests.conftest import _wait_for_sessions_to_close
from tests.processes import Workers
from tests.support import make_pipeline, running_job
from vault import tokens

pytestmark = pytest.mark.django_db(transaction=True)  # web, another process, sees the rows

SIZE = 200 * 1024 * 1024
MB = 1024 * 1024
TARGET = 100  # MB/s

PIPELINE = """
stages:
  - name: build
    jobs:
      - id: make
        artifacts: {paths: [dist/big.bin]}
        steps: [{run: "true"}]
  - name: use
    jobs:
      - id: use
        steps: [{run: "true"}]
"""


@pytest.fixture
def web(worker_env, tmp_path, settings):
    """gunicorn on the test database, as Workers.start_web runs it; the agent's client in
    this process goes to it."""
    group = Workers(worker_env, tmp_path)
    group.start_web()
    try:
        group.wait_web()
        settings.AGENT_SERVER_URL = worker_env["AGENT_SERVER_URL"]
        yield group
    finally:
        group.stop_all()
        _wait_for_sessions_to_close()  # before the flush, and the test database's drop


def client_of(job: JobRun) -> agent_artifacts.Client:
    return agent_artifacts.Client(tokens.for_attempt(job.pk, job.attempt), threading.Event())


def write_random(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        for _ in range(SIZE // (8 * MB)):
            data = os.urandom(8 * MB)
            digest.update(data)
            file.write(data)
    return digest.hexdigest()


def rate(seconds: float) -> float:
    return SIZE / MB / seconds


def test_artifact_upload_and_download_throughput(web, worker_env, tmp_path):
    workspace = tmp_path / "workspace"
    (workspace / "dist").mkdir(parents=True)
    sha = write_random(workspace / "dist" / "big.bin")
    started = time.perf_counter()
    shutil.copyfile(workspace / "dist" / "big.bin", tmp_path / "copy.bin")
    copy = rate(time.perf_counter() - started)
    (tmp_path / "copy.bin").unlink()

    build = services.trigger_build(make_pipeline("bench-artifacts", PIPELINE))
    make = running_job(build, "make")
    [found] = agent_artifacts.collect(workspace, ["dist/big.bin"], required=True)
    client = client_of(make)
    started = time.perf_counter()
    client.upload(found)  # with its sha256 pass over the file, as a job does
    upload = rate(time.perf_counter() - started)
    client.close()
    artifact = Artifact.objects.get(build=build)
    assert (artifact.path, artifact.size, artifact.sha256) == ("dist/big.bin", SIZE, sha)
    assert (Path(worker_env["ARTIFACTS_ROOT"]) / artifact.stored_as).stat().st_size == SIZE

    JobRun.objects.filter(pk=make.pk).update(status=RunStatus.SUCCEEDED)
    client = client_of(running_job(build, "use"))
    [listed] = client.listing()
    assert (listed["id"], listed["sha256"]) == (artifact.pk, sha)
    into = tmp_path / "downloaded.bin"
    started = time.perf_counter()
    client.download(listed, into)  # refuses bytes not matching the recorded sha256
    download = rate(time.perf_counter() - started)
    client.close()
    assert agent_artifacts.sha256_of(into) == sha
    assert into.stat().st_size == SIZE
    print(
        f"\nartifacts: 200 MB through gunicorn on loopback: upload {upload:.0f} MB/s,"
        f" download {download:.0f} MB/s; raw copy on the same disk {copy:.0f} MB/s"
        f" (reference); target >= {TARGET} MB/s"
    )
