"""Artifacts: received from a running job attempt whole or not at all, given to the jobs that
need its job, listed, and deleted when they expire.

A file is streamed into the artifacts storage (settings.STORAGES["artifacts"]) under a name of
its own, while its bytes are counted and hashed; only once it is whole, with the size and
sha256 its agent announced, does the row that makes it visible commit. Anything less (a cut
connection, a wrong checksum, the attempt ended meanwhile) deletes what was stored."""

import hashlib
import logging
import posixpath
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from artifacts.errors import (
    ArtifactChecksumMismatch,
    ArtifactExpired,
    ArtifactIncomplete,
    ArtifactNotFound,
    ArtifactTooLarge,
    InvalidArtifact,
    JobNotRunning,
)
from artifacts.models import Artifact
from builds.definition import DEFAULT_ARTIFACT_EXPIRY, workspace_pattern_refusal
from builds.models import JobRun
from builds.statuses import RunStatus
from ciproject.sizes import format_size

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_PATH = 1000
CHUNK = 1024 * 1024


def storage():
    return storages["artifacts"]


def uploads(job: JobRun) -> dict | None:
    """What the job uploads after its steps (its `artifacts:`), or None."""
    spec = job.definition.get("artifacts")
    return spec or None


def takes_artifacts(job: JobRun) -> bool:
    """Whether the job gets the artifacts of the jobs it waits for: unless `artifacts: false`,
    when one of them uploads some."""
    if job.definition.get("artifacts") is False:
        return False
    uploading = {
        spec["id"] for stage in job.build.spec["stages"] for spec in stage["jobs"]
        if spec.get("artifacts")
    }  # fmt: skip
    if not uploading:  # no job of the build uploads any: no need to ask which it waits for
        return False
    waited = {j.matrix_of or j.key for j in job.waits_for().only("key", "matrix_of")}
    return bool(uploading & waited)


def running_attempt(job_id: int, attempt: int) -> JobRun:
    """The job attempt a token names, while it runs; JobNotRunning otherwise."""
    job = JobRun.objects.filter(pk=job_id, attempt=attempt, status=RunStatus.RUNNING).first()
    if job is None:
        raise JobNotRunning(f"job {job_id} attempt {attempt} is not running")
    return job


def check_path(path) -> str:
    """An artifact's path: relative to the workspace, normalized, inside it."""
    if not isinstance(path, str) or not path or "\0" in path or len(path) > MAX_PATH:
        raise InvalidArtifact(f"path: 1 to {MAX_PATH} characters, no NUL")
    if (why := workspace_pattern_refusal(path)) or posixpath.normpath(path) != path:
        raise InvalidArtifact(f"path: {why or f'{path!r} is not in normal form'}")
    return path


class _Counted(File):
    """The request body as a file of `length` bytes (never read past), hashed as read."""

    DEFAULT_CHUNK_SIZE = CHUNK

    def __init__(self, stream, length: int):
        super().__init__(None, name="artifact")
        self.stream, self.left, self.count = stream, length, 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.stream.read(size) if size else b""
        self.left -= len(data)
        self.count += len(data)
        self.digest.update(data)
        return data

    def chunks(self, chunk_size=None):
        while data := self.read(chunk_size or self.DEFAULT_CHUNK_SIZE):
            yield data

    def seek(self, *args):  # Storage.save rewinds a file it is given; this one starts at 0
        if self.count:
            raise OSError("an upload cannot be read twice")
        return 0

    def close(self):
        pass


def cap_refusal(path: str, size: int, files_before: int, bytes_before: int) -> str | None:
    """Why a job attempt's next file, after `files_before` files of `bytes_before` bytes,
    goes over a cap, or None. The agent asks before it sends anything, web as each arrives."""
    if size > settings.ARTIFACT_MAX_FILE_BYTES:
        return (
            f"{path}: {format_size(size)}, over the cap of"
            f" {format_size(settings.ARTIFACT_MAX_FILE_BYTES)} per file (ARTIFACT_MAX_FILE_BYTES)"
        )
    if files_before >= settings.ARTIFACT_MAX_FILES:
        return (
            f"{path}: over the cap of {settings.ARTIFACT_MAX_FILES} files per job"
            " (ARTIFACT_MAX_FILES)"
        )
    if bytes_before + size > settings.ARTIFACT_MAX_JOB_BYTES:
        return (
            f"{path}: with the {format_size(bytes_before)} before it, over the cap of"
            f" {format_size(settings.ARTIFACT_MAX_JOB_BYTES)} per job (ARTIFACT_MAX_JOB_BYTES)"
        )
    return None


def _check_caps(job: JobRun, path: str, length: int) -> None:
    others = Artifact.objects.filter(job=job, attempt=job.attempt).exclude(path=path)
    used = others.aggregate(total=Sum("size"))["total"] or 0
    if refusal := cap_refusal(path, length, others.count(), used):
        raise ArtifactTooLarge(refusal)


def receive(job_id: int, attempt: int, path, stream, length, sha256) -> Artifact:
    """Store one file of a running job attempt: `length` bytes read from `stream`, which
    must hash to `sha256`. A file at the same path in the same attempt is replaced."""
    path = check_path(path)
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise InvalidArtifact("sha256: 64 lowercase hexadecimal digits")
    if length is None or length < 0:
        raise InvalidArtifact("Content-Length: required")
    job = running_attempt(job_id, attempt)
    _check_caps(job, path, length)
    body = _Counted(stream, length)
    name = f"builds/{job.build_id}/jobs/{job.pk}/{attempt}/{uuid.uuid4().hex}"
    try:
        stored = storage().save(name, body)
    except OSError as exc:  # the client went away mid-body (gunicorn raises an OSError)
        _delete_quietly(name)
        raise ArtifactIncomplete(f"{path}: the upload was cut after {body.count} bytes") from exc
    try:
        if body.count != length:
            raise ArtifactIncomplete(
                f"{path}: the upload ended after {body.count} of its {length} bytes"
            )
        if body.digest.hexdigest() != sha256:
            raise ArtifactChecksumMismatch(f"{path}: the bytes received do not hash to its sha256")
        return _record(job, path, length, sha256, stored)
    except BaseException:
        _delete_quietly(stored)
        raise


def _record(job: JobRun, path: str, size: int, sha256: str, stored: str) -> Artifact:
    with transaction.atomic():
        locked = JobRun.objects.select_for_update(no_key=True).filter(
            pk=job.pk, attempt=job.attempt, status=RunStatus.RUNNING
        )
        if not locked.exists():
            raise JobNotRunning(f"job {job.pk} attempt {job.attempt} ended during the upload")
        _check_caps(job, path, size)  # again, now that parallel uploads are behind the lock
        expiry = (uploads(job) or {}).get("expire_in", DEFAULT_ARTIFACT_EXPIRY)
        replaced = Artifact.objects.filter(job=job, attempt=job.attempt, path=path).first()
        artifact, _ = Artifact.objects.update_or_create(
            job=job,
            attempt=job.attempt,
            path=path,
            defaults={
                "build_id": job.build_id,
                "size": size,
                "sha256": sha256,
                "stored_as": stored,
                "expires_at": timezone.now() + timedelta(seconds=expiry),
                "expired_at": None,
            },
        )
        if replaced:
            transaction.on_commit(lambda: _delete_quietly(replaced.stored_as))
    return artifact


def _delete_quietly(name: str) -> None:
    try:
        storage().delete(name)
    except Exception:  # left for an operator; the row, not the file, makes it visible
        log.warning("could not delete artifact file %s", name, exc_info=True)


def given_to(job: JobRun):
    """The artifacts a job gets before its first step: those the jobs it waits for made in
    their current attempt (none with `artifacts: false`)."""
    if job.definition.get("artifacts") is False:
        return Artifact.objects.none()
    waited = [(j.pk, j.attempt) for j in job.waits_for().only("pk", "attempt")]
    if not waited:
        return Artifact.objects.none()
    made = Q()
    for pk, attempt in waited:
        made |= Q(job_id=pk, attempt=attempt)
    return Artifact.objects.filter(made).select_related("job").order_by("job_id", "path")


def for_download(artifact_id, job: JobRun | None = None, build_id=None) -> Artifact:
    """An artifact a running job gets (`job`), or one of a build (`build_id`), or any, with
    its file."""
    found = given_to(job) if job else Artifact.objects.all()
    if build_id is not None:
        found = found.filter(build_id=build_id)
    artifact = found.filter(pk=artifact_id).select_related("job").first()
    if artifact is None:
        raise ArtifactNotFound(f"no artifact {artifact_id} here")
    if artifact.expired_at:
        raise ArtifactExpired(
            f"{artifact.path} of job {artifact.job.key!r} expired on"
            f" {artifact.expired_at:%Y-%m-%d %H:%M} UTC"
        )
    return artifact


@dataclass
class Freed:
    files: int = 0
    bytes: int = 0


def expire(now=None, dry_run: bool = False, batch: int = 500) -> Freed:
    """Delete the files of the artifacts past their expiry; their rows stay, marked expired.
    Rows are taken a batch at a time, locked and skipped if another expiry has them."""
    now, freed = now or timezone.now(), Freed()
    due = Artifact.objects.filter(expires_at__lte=now, expired_at__isnull=True)
    if dry_run:
        found = due.aggregate(total=Sum("size"))
        return Freed(due.count(), found["total"] or 0)
    while True:
        with transaction.atomic():
            rows = list(due.select_for_update(skip_locked=True).only("stored_as", "size")[:batch])
            if not rows:
                return freed
            Artifact.objects.filter(pk__in=[a.pk for a in rows]).update(expired_at=now)
            # Once marked: a file outliving a crash here is waste, never a dangling row.
            names = [artifact.stored_as for artifact in rows]
            transaction.on_commit(lambda names=names: [_delete_quietly(n) for n in names])
            freed.files += len(rows)
            freed.bytes += sum(artifact.size for artifact in rows)
