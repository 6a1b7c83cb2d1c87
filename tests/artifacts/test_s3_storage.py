"""Artifacts in S3-compatible object storage (storages.backends.s3.S3Storage) against moto's
S3 server on loopback: an upload through the API lands whole in the bucket, people download
the same bytes, a checksum-mismatched upload leaves no object, and expiry deletes it."""

import hashlib
import uuid

import boto3
import pytest
from django.core.files.storage import storages
from django.utils import timezone
from moto.server import ThreadedMotoServer

from artifacts import services
from artifacts.models import Artifact
from builds import services as builds
from tests.artifacts.test_artifacts import PIPELINE, agent_client, put
from tests.processes import free_port
from tests.support import client_for, running_job

pytestmark = pytest.mark.django_db

CREDENTIALS = {"access_key": "testing", "secret_key": "testing", "region_name": "us-east-1"}
WHEEL = b"PK\x03\x04 a wheel" * 1000
BIG = bytes(range(256)) * (40 * 1024 + 7)  # ~10 MB: over boto3's multipart threshold (8 MB)


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def forget_storages():
    """So that storages["artifacts"] is built again from settings.STORAGES."""
    storages._storages = {}
    storages._backends = None
    storages.__dict__.pop("backends", None)


@pytest.fixture
def bucket(s3_endpoint, settings):
    """A bucket of the test's own, which the "artifacts" storage is, until the test ends."""
    name = f"artifacts-{uuid.uuid4().hex[:12]}"
    s3 = boto3.resource(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=CREDENTIALS["access_key"],
        aws_secret_access_key=CREDENTIALS["secret_key"],
        region_name=CREDENTIALS["region_name"],
    )
    s3.create_bucket(Bucket=name)
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {"bucket_name": name, "endpoint_url": s3_endpoint, **CREDENTIALS},
        },
    }
    forget_storages()
    try:
        yield s3.Bucket(name)
    finally:
        forget_storages()  # and the settings fixture restores STORAGES after this


def objects(bucket) -> dict[str, bytes]:
    return {o.key: o.get()["Body"].read() for o in bucket.objects.all()}


@pytest.fixture
def build():
    return builds.trigger_build(builds.save_pipeline("wheels", PIPELINE))


@pytest.mark.parametrize("data", [WHEEL, BIG], ids=["small", "multipart"])
def test_an_upload_lands_whole_in_the_bucket_and_downloads_the_same(build, bucket, data):
    assert type(services.storage()).__name__ == "S3Storage"
    make = running_job(build, "make")
    answer = put(agent_client(make), "dist/app.whl", data)
    assert answer.status_code == 201, answer.content
    artifact = Artifact.objects.get()
    assert (artifact.size, artifact.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert objects(bucket) == {artifact.stored_as: data}
    got = client_for("builds.view_build").get(f"/api/builds/{build.pk}/artifacts/{artifact.pk}/")
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == data
    assert got["X-Artifact-Sha256"] == artifact.sha256


def test_a_checksum_mismatch_leaves_no_object_in_the_bucket(build, bucket):
    make = running_job(build, "make")
    answer = put(agent_client(make), "dist/a.whl", WHEEL, sha="0" * 64)
    assert (answer.status_code, answer.json()["code"]) == (400, "ARTIFACT_CHECKSUM_MISMATCH")
    assert not Artifact.objects.exists()
    assert objects(bucket) == {}


def test_expiry_deletes_the_object(build, bucket, django_capture_on_commit_callbacks):
    make = running_job(build, "make")
    for path in ("dist/old.whl", "dist/new.whl"):
        assert put(agent_client(make), path, WHEEL).status_code == 201
    old = Artifact.objects.get(path="dist/old.whl")
    new = Artifact.objects.get(path="dist/new.whl")
    assert sorted(objects(bucket)) == sorted([old.stored_as, new.stored_as])
    Artifact.objects.filter(pk=old.pk).update(expires_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=True):  # objects go once the rows commit
        freed = services.expire()
    assert (freed.files, freed.bytes) == (1, len(WHEEL))
    assert list(objects(bucket)) == [new.stored_as]
    old.refresh_from_db()
    assert old.expired_at is not None
