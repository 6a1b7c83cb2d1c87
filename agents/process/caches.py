"""A job's `cache:` on its build node: restored before the first step when an entry of its key
is there, saved after a successful job when none was. Each agent keeps its own entries
(AGENT_CACHE_ROOT/<agent>), one tar file per pipeline and key, written aside and renamed
into place so a reader never sees half of one; past AGENT_CACHE_MAX_BYTES the least recently
used go.

What a cache holds came from steps, so it is handled as theirs: a path is taken only where it
really lies in the workspace or the step user's home (never through a link that leads out),
only the step user's own files go in, and a restore never writes through a link (tarfile's
`tar` filter) and gives what it wrote to the step user."""

import contextlib
import fcntl
import hashlib
import os
import pwd
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from agents.process.artifacts import sha256_of
from builds.definition import CACHE_HASH_RE
from ciproject.sizes import format_size

HOME = "~/"
ROOTS = ("workspace", "home")  # the top folders of an entry, one per place a path is in


class CacheError(Exception):
    """Why a job's cache was not restored or saved (the job goes on without it)."""


@dataclass
class Cache:
    """One job's cache on this agent: its key, made from the workspace, and where it is."""

    key: str
    entry: Path
    workspace: Path
    home: Path | None
    paths: list[str]
    user: object = None  # agents.process.step_user.StepUser, or None

    def place_of(self, path: str) -> tuple[str, Path, str]:
        """(root name, root folder, path below it) of a `paths` entry."""
        if path.startswith(HOME):
            if self.home is None:
                raise CacheError(f"{path}: the step user has no home folder")
            return "home", self.home, path.removeprefix(HOME)
        return "workspace", self.workspace, path


def key_of(template: str, workspace: Path) -> str:
    """The key, with each `{hash:FILE}` the sha256 of that file in the workspace."""

    def digest(match) -> str:
        file = workspace / match.group(1)
        real = os.path.realpath(file)
        if not _inside(real, workspace) or not os.path.isfile(real):
            raise CacheError(f"{{hash:{match.group(1)}}}: no such file in the workspace")
        return sha256_of(Path(real))

    return CACHE_HASH_RE.sub(digest, template)


def home_of(user) -> Path | None:
    home = user.home if user else os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    return Path(home) if home and os.path.isdir(home) else None


def for_job(spec: dict, workspace: Path, agent_name: str, pipeline_id: int, user=None) -> Cache:
    key = key_of(spec["key"], workspace)
    # A pipeline's own: another's steps (another team's) never fill what this one restores.
    name = hashlib.sha256(f"{pipeline_id}\0{key}".encode()).hexdigest()
    entry = Path(settings.AGENT_CACHE_ROOT) / agent_name / f"{name}.tar"
    return Cache(key, entry, workspace, home_of(user), list(spec["paths"]), user)


def restore(cache: Cache) -> str | None:
    """Put the entry's files in place; what it did (for the log), or None on a miss. An
    entry that cannot be read is removed (the job saves a new one)."""
    try:
        return _restore(cache)
    except (tarfile.TarError, OSError) as exc:
        cache.entry.unlink(missing_ok=True)
        raise CacheError(f"cache {cache.key}: its entry could not be read ({exc})") from exc


def _restore(cache: Cache) -> str | None:
    started = time.monotonic()
    try:
        fd = os.open(cache.entry, os.O_RDONLY)  # once open, it stays whole if evicted
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file, tarfile.open(fileobj=file) as archive:
        os.utime(cache.entry)  # used: the last to be evicted
        count = size = 0
        for member in archive:
            top, _, below = member.name.partition("/")
            if top not in ROOTS or not below:
                continue
            root = cache.workspace if top == "workspace" else cache.home
            if root is None:
                continue
            member.name = below
            if member.islnk():  # a hard link names another member, by its name in the archive
                member.linkname = member.linkname.partition("/")[2]
            try:
                archive.extract(member, root, filter="tar", numeric_owner=True)
            except tarfile.FilterError as exc:
                raise CacheError(f"cache {cache.key}: {member.name} not restored ({exc})") from exc
            if cache.user:
                os.lchown(root / below, cache.user.uid, cache.user.gid)
            if not member.isdir():
                count, size = count + 1, size + member.size
    return (
        f"cache {cache.key}: hit, restored {count} files ({format_size(size)}) in"
        f" {time.monotonic() - started:.2f} s"
    )


def save(cache: Cache) -> str:
    """Archive the cache's paths into its entry, then evict the least recently used past
    the cap; what it did, for the log."""
    try:
        return _save(cache)
    except (tarfile.TarError, OSError) as exc:
        raise CacheError(f"cache {cache.key}: not saved ({exc})") from exc


def _save(cache: Cache) -> str:
    started = time.monotonic()
    cache.entry.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(prefix=".saving-", dir=cache.entry.parent)
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w") as archive:
            count = sum(_add(archive, cache, path) for path in cache.paths)
        size = os.path.getsize(part)
        if size > settings.AGENT_CACHE_MAX_BYTES:
            raise CacheError(
                f"cache {cache.key}: not saved, {format_size(size)} is over"
                f" AGENT_CACHE_MAX_BYTES ({format_size(settings.AGENT_CACHE_MAX_BYTES)})"
            )
        with _locked(cache.entry.parent):
            os.replace(part, cache.entry)
            evicted = _evict(cache.entry.parent, keep=cache.entry)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
    note = (
        f"cache {cache.key}: saved {count} files ({format_size(size)}) in"
        f" {time.monotonic() - started:.2f} s"
    )
    return note + (f", {evicted} older entries evicted" if evicted else "")


def _add(archive: tarfile.TarFile, cache: Cache, path: str) -> int:
    top, root, below = cache.place_of(path)
    target = root / below
    # Every folder on the way must really be in the root: a link there would have the agent
    # archive what lies elsewhere. The last part may be a link: it is stored as one.
    if not _inside(os.path.realpath(target.parent), root):
        raise CacheError(f"{path}: leads out of the {top} through a symbolic link")
    if not os.path.lexists(target):
        return 0
    added = 0

    def theirs(member: tarfile.TarInfo):
        nonlocal added
        if cache.user and member.uid != cache.user.uid:
            return None  # not the step user's: never theirs to get back
        added += 0 if member.isdir() else 1
        return member

    # The folders above it first, so a restore makes them as they were (the step user's),
    # not as the agent's.
    parents = Path(below).parents
    for parent in reversed(parents[:-1]):
        archive.add(root / parent, arcname=f"{top}/{parent}", recursive=False, filter=theirs)
    archive.add(target, arcname=f"{top}/{below}", recursive=True, filter=theirs)
    return added


def _inside(real: str, root: Path) -> bool:
    base = os.path.realpath(root)
    return real == base or real.startswith(base + os.sep)


@contextlib.contextmanager
def _locked(folder: Path):
    """One save at a time per agent's entries (threads of one agent, or two on a host)."""
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _evict(folder: Path, keep: Path) -> int:
    entries = []
    for entry in folder.glob("*.tar"):
        with contextlib.suppress(FileNotFoundError):
            info = entry.stat()
            entries.append((info.st_mtime, info.st_size, entry))
    total, evicted = sum(size for _, size, _ in entries), 0
    for _, size, entry in sorted(entries):  # least recently used first
        if total <= settings.AGENT_CACHE_MAX_BYTES:
            break
        if entry != keep:
            entry.unlink(missing_ok=True)
            total, evicted = total - size, evicted + 1
    return evicted
