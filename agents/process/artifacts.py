"""The agent's side of artifacts: after a job's steps, the files its `artifacts:` paths match
are uploaded to web, each with its sha256; before a job's first step, the artifacts of the
jobs it waits for are downloaded into its workspace, each checked against its sha256. Both
go through web (settings.AGENT_SERVER_URL) with the job attempt's token: build nodes share
no file system.

The steps have ended when files are collected, but what they left is theirs: a path is taken
only if it really lies in the workspace (a symbolic link is followed only to a file inside
it), and a download never writes through a link a step made."""

import contextlib
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from django.conf import settings

from artifacts import services
from ciproject.sizes import format_size

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
TRIES = 3  # per file, for a cut connection or a server error
SHA256_HEADER = "X-Artifact-Sha256"
TIMEOUT = (10, 120)  # seconds: to connect, and between two reads


class ArtifactError(Exception):
    """Why the job's artifacts could not be collected, uploaded or downloaded."""


class Stopped(ArtifactError):
    pass


@dataclass(frozen=True, order=True)
class Found:
    path: str  # relative to the workspace, "/"-separated
    real: Path
    size: int


def _segment_re(segment: str) -> str:
    """One path segment of a glob: `*` and `?` stay within it; [...] is a class."""
    out, i = "", 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[" and (end := segment.find("]", i + 2)) != -1:
            inner = segment[i + 1 : end]
            out += "[" + ("^" + inner[1:] if inner.startswith("!") else inner) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return out


def pattern_re(pattern: str) -> re.Pattern:
    """A glob relative to the workspace as a regex on "/"-separated paths: `**` as a whole
    segment is any number of folders (at the end: everything below)."""
    parts = pattern.strip("/").split("/")
    out = ""
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if part == "**":
            out += ".+" if last else "(?:[^/]+/)*"
        else:
            out += _segment_re(part) + ("" if last else "/")
    return re.compile(out)


def _literal_prefix(pattern: str) -> str:
    """The folders of `pattern` before its first wildcard: all its matches are below them."""
    fixed = []
    for part in pattern.strip("/").split("/")[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return "/".join(fixed)


def collect(workspace: Path, paths: list[str], required: bool) -> list[Found]:
    """The files `paths` (globs) match in the workspace; a folder that matches brings all
    below it. ArtifactError naming the path for one that leads out of the workspace, and
    for a pattern matching nothing when the artifacts are `required`."""
    root = workspace.resolve()
    found: dict[str, Found] = {}
    for pattern in paths:
        regex = pattern_re(pattern)
        matched = False
        for rel, kind in _walk(root, _literal_prefix(pattern)):
            if not regex.fullmatch(rel):
                continue
            matched = True
            if kind == "dir":
                for below, below_kind in _walk(root, rel):
                    if below_kind != "dir":
                        _take(root, below, found)
            else:
                _take(root, rel, found)
        if not matched and required:
            raise ArtifactError(
                f"{pattern}: matches nothing in the workspace (the job's artifacts are required)"
            )
    return sorted(found.values())


def _walk(root: Path, below: str):
    """(path, "dir" | "file" | "link" | "other") for everything under root/below, links not
    followed."""
    start = root / below if below else root
    if below and (start.is_symlink() or not start.is_dir()):
        if os.path.lexists(start):
            yield below, "link" if start.is_symlink() else "file"
        return
    for folder, dirs, files in os.walk(start, followlinks=False):
        rel_folder = os.path.relpath(folder, root).replace(os.sep, "/")
        prefix = "" if rel_folder == "." else rel_folder + "/"
        for name in dirs:
            path = Path(folder, name)
            yield prefix + name, "link" if path.is_symlink() else "dir"
        for name in files:
            path = Path(folder, name)
            yield prefix + name, "link" if path.is_symlink() else "file"


def _take(root: Path, rel: str, found: dict[str, Found]) -> None:
    path = root / rel
    real = path.resolve()
    if not real.is_relative_to(root):
        raise ArtifactError(f"{rel}: a symbolic link out of the workspace (to {real})")
    info = os.stat(real)
    if stat.S_ISDIR(info.st_mode):
        return  # a link to a folder in the workspace: not followed (its files may be matched)
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{rel}: not a regular file")
    found[rel] = Found(rel, real, info.st_size)


def check_caps(files: list[Found]) -> None:
    """The server's caps, checked before anything is sent, so the job says which file."""
    total = 0
    for n, file in enumerate(files):
        if refusal := services.cap_refusal(file.path, file.size, n, total):
            raise ArtifactError(refusal)
        total += file.size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while data := file.read(CHUNK):
            digest.update(data)
    return digest.hexdigest()


class _Body:
    """A file as a request body of known length that stops when the job is stopped (the
    connection is dropped mid-way, so the server keeps nothing of it)."""

    def __init__(self, file, size: int, stop):
        self.file, self.size, self.stop = file, size, stop

    def __len__(self) -> int:
        return self.size

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise Stopped("stopped during the upload")
        return self.file.read(CHUNK if size is None or size < 0 else max(size, CHUNK))


class Client:
    """Web's artifact endpoints, as one job attempt (its token)."""

    def __init__(self, token: str, stop):
        self.base = f"{settings.AGENT_SERVER_URL}/api/agent/artifacts/"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Job {token}"
        self.stop = stop

    def close(self) -> None:
        self.session.close()

    def _send(self, what: str, call):
        """Run `call` up to TRIES times while the connection is cut or web errs."""
        for attempt in range(1, TRIES + 1):
            if self.stop.is_set():
                raise Stopped(f"stopped before {what}")
            try:
                response = call()
            except Stopped:
                raise
            except requests.RequestException as exc:
                cause = f"{settings.AGENT_SERVER_URL} unreachable ({exc.__class__.__name__})"
            else:
                if response.status_code < 400:
                    return response
                cause = _error_of(response)
                if response.status_code < 500 and "ARTIFACT_INCOMPLETE" not in cause:
                    raise ArtifactError(f"{what}: {cause}")
            if attempt < TRIES:
                log.warning("%s: %s; trying again", what, cause)
                self.stop.wait(0.5 * attempt)
        raise ArtifactError(f"{what}: {cause} ({TRIES} tries)")

    def upload(self, file: Found) -> None:
        sha = sha256_of(file.real)

        def put():
            with open(file.real, "rb") as opened:
                return self.session.put(
                    self.base + "upload/",
                    params={"path": file.path},
                    data=_Body(opened, file.size, self.stop),
                    headers={SHA256_HEADER: sha, "Content-Type": "application/octet-stream"},
                    timeout=TIMEOUT,
                )

        self._send(f"upload of {file.path}", put)

    def listing(self) -> list[dict]:
        return self._send(
            "the list of artifacts", lambda: self.session.get(self.base, timeout=TIMEOUT)
        ).json()

    def download(self, artifact: dict, into: Path) -> None:
        """Stream one artifact into the file `into`, refusing it unless its bytes hash to
        the sha256 recorded at its upload."""
        what = f"{artifact['path']} from job {artifact['job']!r}"

        def get():
            digest = hashlib.sha256()
            response = self.session.get(
                f"{self.base}{artifact['id']}/", stream=True, timeout=TIMEOUT
            )
            if response.status_code >= 400:
                return response
            with response, open(into, "wb") as file:
                for data in response.iter_content(CHUNK):
                    if self.stop.is_set():
                        raise Stopped("stopped during a download")
                    digest.update(data)
                    file.write(data)
            response.digest = digest.hexdigest()
            return response

        got = self._send(f"download of {what}", get)
        if got.digest != artifact["sha256"]:
            raise ArtifactError(
                f"{what}: refused, its bytes do not match the sha256 recorded at its upload"
                f" ({got.digest[:12]}... is not {artifact['sha256'][:12]}...): corrupted in"
                " storage or on the way"
            )


def _error_of(response) -> str:
    try:
        body = response.json()
        return f"{body['code']}: {body['detail']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def upload(client: Client, workspace: Path, spec: dict) -> str:
    """Collect and upload a job's artifacts; returns what it did, for the job's log."""
    started = time.monotonic()
    files = collect(workspace, spec["paths"], spec["required"])
    check_caps(files)
    for file in files:
        client.upload(file)
    total = sum(file.size for file in files)
    return (
        f"uploaded {len(files)} artifacts ({format_size(total)}) in"
        f" {time.monotonic() - started:.1f} s"
    )


def download(client: Client, workspace: Path, user=None) -> str:
    """Put the artifacts of the jobs this one waits for into its workspace; returns what it
    did, for the job's log. A later job's file at a path replaces an earlier one's."""
    started = time.monotonic()
    artifacts = client.listing()
    for artifact in artifacts:
        if artifact["expired"]:
            raise ArtifactError(
                f"{artifact['path']} from job {artifact['job']!r} has expired (its file is"
                " deleted): run that job again"
            )
    staging = Path(tempfile.mkdtemp(prefix=".artifacts-", dir=workspace.parent))
    try:
        for artifact in artifacts:
            part = staging / str(artifact["id"])
            client.download(artifact, part)
            target = _place(workspace, artifact["path"], user)
            os.replace(part, target)
            if user:
                user.own(target)
    finally:
        with contextlib.suppress(OSError):
            for left in staging.iterdir():
                left.unlink()
            staging.rmdir()
    total = sum(artifact["size"] for artifact in artifacts)
    return (
        f"downloaded {len(artifacts)} artifacts ({format_size(total)}) in"
        f" {time.monotonic() - started:.1f} s"
    )


def _place(workspace: Path, rel: str, user) -> Path:
    """The file `rel` of the workspace, its folders made (given to the step user), never
    through a link: a step cannot turn a download into a write elsewhere."""
    parts = rel.split("/")
    if not rel or any(part in ("", ".", "..") for part in parts):
        raise ArtifactError(f"{rel!r}: not a path in the workspace")
    folder = workspace
    for part in parts[:-1]:
        folder = folder / part
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ArtifactError(f"{rel}: {part!r} in the workspace is not a folder")
        if not folder.exists():
            folder.mkdir()
            if user:
                user.own(folder)
    target = folder / parts[-1]
    if target.is_symlink() or target.is_dir():
        raise ArtifactError(f"{rel}: already in the workspace as a link or a folder")
    return target
