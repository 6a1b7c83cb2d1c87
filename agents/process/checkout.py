"""A build's commit from its forge, put in a job's workspace before its first step.

Each repository has a bare mirror on the build node, <mirror root>/<sha256 of its URL>.git:
a checkout fetches the build's ref into it (so a second build of the repository fetches only
what is new), then clones the commit from it into the workspace, its objects hardlinked
(or, with a depth, a shallow fetch of that depth). The mirror root is the agent's alone
(0700): a step never reaches another repository's mirror. A lock file beside each mirror,
flocked while fetching into it and cloning from it, keeps the jobs of one agent (threads)
and the agents of one host from meeting in it. Past the mirrors' size cap, the least
recently used mirrors (by their lock file's time, touched at each use) are removed, each
under its lock, moved aside first: a checkout waiting for that lock then makes it anew.

Clone credentials reach git only through its environment, read by the agent's own
GIT_ASKPASS script (which holds none), and only for the clone URL's own host: never on a
command line, in a repository's config, or in what a step sees. Git reads no system or global
config and runs no hook; it may use http, https and git://, and file:// only where the agent
clones from its own mirror, never for a repository's submodules.
"""

import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ciproject import git as ciproject_git
from vault.masking import Masker

GIT = "git"
TIMEOUT = 1800.0  # the whole checkout, all its git commands together
SHA_RE = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # SHA-1 or SHA-256, in full
POLL = 0.1  # how often a running git command, or a wait for the lock, looks at the stop
REASON_MAX = 1000
# A mirror's HEAD names a ref that is never fetched: a clone of it makes no branch.
NO_HEAD = "refs/ciproject/none"


class CheckoutError(Exception):
    """Why the build's commit is not in the workspace (the job fails with it)."""


class Stopped(CheckoutError):
    """The job was stopped during its checkout."""


@dataclass(frozen=True)
class Source:
    """What a job checks out: `sha` (in full), fetched with the build's `ref` (refs/heads/main,
    refs/tags/v1, refs/pull/7/head) from `url`, which carries no credentials."""

    url: str
    sha: str
    ref: str
    depth: int | None = None  # a shallow workspace of that many commits; None: all history
    submodules: bool = False
    username: str = ""
    password: str = field(default="", repr=False)


def mirror_path(mirror_root: Path, url: str) -> Path:
    return mirror_root / f"{hashlib.sha256(url.encode()).hexdigest()}.git"


def lock_path(mirror: Path) -> Path:
    return mirror.with_suffix(".lock")


def checkout(
    source: Source,
    workspace: Path,
    mirror_root: Path,
    step_user,
    stop: threading.Event,
    timeout: float = TIMEOUT,
    max_bytes: int | None = None,
) -> str:
    """Put `source`'s commit in the (empty) workspace, HEAD detached at it and the build's
    ref pointing at it, its files the step user's (agents.process.step_user.StepUser, or
    None); returns a note for the job's log. Raises CheckoutError (Stopped if `stop` was
    set); what it left in the workspace is the caller's to remove. With `max_bytes`, the
    other mirrors least recently used are evicted until all take at most that."""
    try:
        _check(source)
        note = _checkout(
            source, Path(os.path.realpath(workspace)), mirror_root, step_user, stop, timeout
        )
    except OSError as exc:  # no git; the mirror root or the workspace (a full disk, a permission)
        raise CheckoutError(f"checkout {source.sha[:12]}: {exc}") from exc
    if max_bytes is not None:
        root = Path(os.path.realpath(mirror_root))
        try:
            evicted = evict(root, max_bytes, keep=mirror_path(root, source.url))
        except OSError as exc:  # the job has its commit: this is the node's problem
            return note + f"; no mirror evicted: {exc}"
        if evicted:
            note += f"; {evicted} mirror{'s' if evicted > 1 else ''} least recently used evicted"
    return note


def _checkout(source, workspace, mirror_root, step_user, stop, timeout) -> str:
    if workspace.exists() and any(workspace.iterdir()):
        raise CheckoutError(f"the workspace {workspace} is not empty: a checkout needs a new one")
    root = _private_root(mirror_root)
    git = _Git(_environment(root, source, workspace), stop, timeout, source.password)
    mirror = mirror_path(root, source.url)
    times = [time.monotonic()]  # asked for the lock, had it, fetched, cloned, submodules
    with _locked(lock_path(mirror), git):
        times.append(time.monotonic())
        new = _make_mirror(git, mirror)
        _fetch(git, mirror, source)
        times.append(time.monotonic())
        value = _ref_value(git, mirror, source)
        _clone(git, mirror, workspace, source, value)
    _finish(git, workspace, source, value)
    times.append(time.monotonic())
    if source.submodules:
        git.run("-C", workspace, "submodule", "update", "--init", "--recursive", "--quiet")
        times.append(time.monotonic())
    if step_user:
        _give(workspace, step_user)
    steps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return _note(source, new, *steps)


def _check(source: Source) -> None:
    url = source.url
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise CheckoutError("the clone URL has a space or a control character in it")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # (an unclosed [ of an IPv6 address)
        raise CheckoutError(f"{url}: not a clone URL ({exc})") from None
    if parts.scheme not in ciproject_git.SCHEMES or not parts.netloc:
        schemes = ", ".join(ciproject_git.SCHEMES)
        raise CheckoutError(f"{url}: not a clone URL git may use here ({schemes})")
    if "@" in parts.netloc:
        raise CheckoutError(
            "the clone URL carries credentials (user@ or user:password@): they reach git"
            " through the agent's askpass, never in the URL"
        )
    if not SHA_RE.fullmatch(source.sha):
        raise CheckoutError(f"{source.sha!r} is not a full commit id in lowercase hex")
    if not source.ref.startswith("refs/") or not _valid_ref(source.ref):
        raise CheckoutError(f"{source.ref!r} is not a full ref name (refs/heads/main)")
    depth = source.depth
    if depth is not None and (type(depth) is not int or depth < 1):
        raise CheckoutError(f"depth {depth!r}: a depth is a whole number of commits, 1 or more")
    if source.password and not source.username:
        raise CheckoutError("clone credentials with a password need a username too")
    if any(ch in value for value in (source.username, source.password) for ch in "\n\r\0"):
        raise CheckoutError("clone credentials may not hold a line break or a NUL")


def _valid_ref(ref: str) -> bool:
    # git's own rules, before any command of ours takes the name as a refspec.
    result = subprocess.run(
        [GIT, "check-ref-format", ref], env={"PATH": os.environ.get("PATH") or os.defpath},
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )  # fmt: skip
    return result.returncode == 0


def _private_root(mirror_root: Path) -> Path:
    """The mirror root, made the agent's alone, with git's HOME (where ciproject.git puts the
    askpass script) in it."""
    root = Path(os.path.realpath(mirror_root))
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(root)
    if info.st_uid != os.geteuid():
        raise CheckoutError(f"the mirror root {root} is not the agent's user's")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(root, 0o700)
    (root / ".home").mkdir(mode=0o700, exist_ok=True)
    return root


def _environment(root: Path, source: Source, workspace: Path) -> dict[str, str]:
    env = ciproject_git.environment(root / ".home", source.url, source.username, source.password)
    config = {
        # protocol.file.allow is only given (with -c) to the commands cloning from a mirror.
        "protocol.allow": "never",
        "protocol.https.allow": "always",
        "protocol.http.allow": "always",
        "protocol.git.allow": "always",
        "core.hooksPath": os.devnull,  # no hook runs as the agent's user
        "safe.directory": str(workspace),  # the step user's folder, our repository in it
        "init.defaultBranch": "main",  # (quiet: git's hint about it is no news)
        "gc.autoDetach": "false",  # a mirror's gc runs under its lock, not after it
        "transfer.unpackLimit": "1",  # whole packs: a killed fetch leaves no half commit
    }
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for number, (key, value) in enumerate(config.items()):
        env[f"GIT_CONFIG_KEY_{number}"], env[f"GIT_CONFIG_VALUE_{number}"] = key, value
    return env


def _command(args) -> str:
    """The git command of an argument list (past -C DIR and -c KEY=VALUE), for messages."""
    words = iter(map(str, args))
    for word in words:
        if word in ("-C", "-c"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return "?"


class _Git:
    """Git commands in the checkout's environment, within its time, ended by its stop."""

    def __init__(self, env: dict[str, str], stop: threading.Event, timeout: float, secret: str):
        self.env, self.stop, self.timeout = env, stop, timeout
        self.deadline = time.monotonic() + timeout
        self.masker = Masker([secret] if secret else [])

    def run(self, *args, input: bytes | None = None) -> str:
        """git's stdout; a failure raises CheckoutError with git's message."""
        result = self.attempt(*args, input=input)
        if result.returncode != 0:
            raise CheckoutError(f"git {_command(args)} failed: {self.message(result)}")
        return result.stdout.decode(errors="replace")

    def attempt(self, *args, input: bytes | None = None) -> subprocess.CompletedProcess:
        argv = [GIT, *map(str, args)]
        command = _command(args)
        if self.stop.is_set():
            raise Stopped(f"stopped before git {command}")
        with subprocess.Popen(
            argv, env=self.env, stdin=subprocess.PIPE if input else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            umask=0o022,  # a workspace's objects are hardlinked from the mirror: readable
        ) as proc:  # fmt: skip
            out, err = self._wait(proc, command, input)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _wait(self, proc: subprocess.Popen, command: str, input: bytes | None):
        while True:
            try:
                return proc.communicate(input, timeout=POLL)
            except subprocess.TimeoutExpired:
                if not self.stop.is_set() and time.monotonic() < self.deadline:
                    continue
            # git's helpers (remote-http, index-pack, upload-pack) are in its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if self.stop.is_set():
                raise Stopped(f"stopped while git {command} ran")
            raise CheckoutError(
                f"git {command} did not finish within the checkout's {self.timeout:.0f} s"
            )

    def message(self, result: subprocess.CompletedProcess) -> str:
        """git's message, without its hints, masked and trimmed."""
        lines = self.masker.mask(result.stderr).decode(errors="replace").splitlines()
        kept = [line.strip() for line in lines if line.strip() and not line.startswith("hint:")]
        text = "; ".join(kept) or f"exit code {result.returncode}"
        return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


@contextlib.contextmanager
def _locked(path: Path, git: _Git):
    """The mirror's lock: one checkout in it at a time, of any thread or agent on the host."""
    with open(path, "a") as lock:
        os.utime(path)  # used now: the last to be evicted
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if git.stop.wait(POLL):
                    raise Stopped("stopped while waiting for the repository's mirror") from None
                if time.monotonic() >= git.deadline:
                    raise CheckoutError(
                        "another checkout of the repository held its mirror for the"
                        f" checkout's {git.timeout:.0f} s"
                    ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def evict(root: Path, max_bytes: int, keep: Path) -> int:
    """Remove the least recently used mirrors of `root`, never `keep`, until the mirrors take
    at most `max_bytes`; one in use (its lock held) is passed over. How many went."""
    mirrors = []
    for mirror in root.glob("*.git"):
        with contextlib.suppress(FileNotFoundError):
            mirrors.append((lock_path(mirror).stat().st_mtime, _size(mirror), mirror))
    total, evicted = sum(size for _, size, _ in mirrors), 0
    for _, size, mirror in sorted(mirrors):  # least recently used first
        if total <= max_bytes:
            break
        if mirror != keep and _remove_unused(mirror):
            total, evicted = total - size, evicted + 1
    return evicted


def _size(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def _remove_unused(mirror: Path) -> bool:
    # The lock file stays: a checkout that opened it and waits for it must lock what the next
    # one opens, or two would be in the new mirror at once.
    with open(lock_path(mirror), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            if not mirror.is_dir():
                return False
            aside = mirror.with_suffix(".evicted")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(mirror, aside)  # whoever takes the lock next finds no mirror, whole or not
            shutil.rmtree(aside, ignore_errors=True)
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _make_mirror(git: _Git, mirror: Path) -> bool:
    """The mirror, made if missing (True then). It is made aside and renamed into place: a
    mirror there was made whole."""
    if mirror.is_dir():
        return False
    part = mirror.with_suffix(".new")
    shutil.rmtree(part, ignore_errors=True)  # what a killed checkout left (we hold the lock)
    git.run("init", "--bare", "--quiet", part)
    # Our own clones take a commit by its id, advertised or not (a shallow one needs it).
    git.run("-C", part, "config", "uploadpack.allowAnySHA1InWant", "true")
    git.run("-C", part, "symbolic-ref", "HEAD", NO_HEAD)
    os.rename(part, mirror)
    return True


def _fetch(git: _Git, mirror: Path, source: Source) -> None:
    """The build's ref into the mirror under its own name (forced: a force-push moves it),
    then the commit itself if the ref no longer leads to it. The ref's fetch must succeed
    whatever the mirror holds: it is what shows these credentials may read the repository."""
    _clear_stale_locks(mirror)
    _clear_conflicts(git, mirror, source.ref)
    fetch = ("-C", mirror, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--")
    failed = git.attempt(*fetch, source.url, f"+{source.ref}:{source.ref}")
    if failed.returncode == 0:
        if _has_commit(git, mirror, source.sha):
            return
        # Not reachable from the ref (rewritten since): servers that allow it give it by id.
        failed = git.attempt(*fetch, source.url, source.sha)
        if failed.returncode == 0 and _has_commit(git, mirror, source.sha):
            return
    reason = git.message(failed) if failed.returncode else "the server does not have it"
    raise CheckoutError(
        f"commit {source.sha} ({source.ref}) could not be fetched from {source.url}: {reason}"
    )


def _clear_stale_locks(mirror: Path) -> None:
    """Lock files of a git killed in the mirror; no other git is in it (we hold its lock),
    and one would fail every later fetch."""
    for name in ("HEAD.lock", "config.lock", "packed-refs.lock", "shallow.lock"):
        (mirror / name).unlink(missing_ok=True)
    for stale in (mirror / "refs").rglob("*.lock"):
        stale.unlink(missing_ok=True)


def _clear_conflicts(git: _Git, mirror: Path, ref: str) -> None:
    """A ref of the mirror in the way of the build's (refs/heads/a for refs/heads/a/b, or
    the reverse): the branch was deleted upstream since, and its name would fail the fetch."""
    parts = ref.split("/")
    above = ["/".join(parts[:count]) for count in range(3, len(parts))]
    listed = git.run("-C", mirror, "for-each-ref", "--format=%(refname)", ref, *above).split()
    for other in listed:
        if other != ref and (ref.startswith(other + "/") or other.startswith(ref + "/")):
            git.run("-C", mirror, "update-ref", "-d", other)


def _has_commit(git: _Git, mirror: Path, sha: str) -> bool:
    return git.attempt("-C", mirror, "cat-file", "-e", f"{sha}^{{commit}}").returncode == 0


def _ref_value(git: _Git, mirror: Path, source: Source) -> str:
    """What the build's ref holds in the workspace: the commit, or for a tag still on it the
    annotated tag object (`git describe` finds only those)."""
    if not source.ref.startswith("refs/tags/"):
        return source.sha
    listed = git.run(
        "-C", mirror, "for-each-ref", "--format=%(refname) %(objectname) %(*objectname)", source.ref
    )
    for line in listed.splitlines():
        name, value, *peeled = line.split()
        if name == source.ref and peeled == [source.sha]:
            return value
    return source.sha


def _clone(git: _Git, mirror: Path, workspace: Path, source: Source, value: str) -> None:
    """The commit's objects into the workspace, from the mirror (under its lock)."""
    from_mirror = ("-c", "protocol.file.allow=always")
    if source.depth is None:
        # A local clone hardlinks the mirror's objects (copies them across file systems; an
        # explicit --local would fail there instead). --single-branch of a mirror whose HEAD
        # is nothing takes no ref of it: the workspace gets only the build's.
        git.run(
            *from_mirror, "clone", "--quiet", "--no-checkout", "--single-branch", "--no-tags",
            "--", mirror, workspace,
        )  # fmt: skip
        git.run("-C", workspace, "remote", "remove", "origin")  # (and its branch's config)
    else:
        git.run("init", "--quiet", workspace)
        git.run(
            "-C", workspace, *from_mirror, "fetch", "--quiet", "--no-tags",
            "--no-write-fetch-head", f"--depth={source.depth}", "--", f"file://{mirror}", value,
        )  # fmt: skip


def _finish(git: _Git, workspace: Path, source: Source, value: str) -> None:
    """origin as steps expect it (the forge's URL: relative submodule URLs go by it), HEAD
    detached at the commit, its files out, and the build's ref there too."""
    git.run("-C", workspace, "remote", "add", "origin", source.url)
    git.run("-C", workspace, "checkout", "--quiet", "--force", "--detach", source.sha)
    updates = f"update {source.ref} {value}\n"
    if source.ref.startswith("refs/heads/"):  # as a clone of the forge would have it
        branch = source.ref.removeprefix("refs/heads/")
        updates += f"update refs/remotes/origin/{branch} {source.sha}\n"
    git.run("-C", workspace, "update-ref", "--stdin", input=updates.encode())


def _give(workspace: Path, user) -> None:
    """Everything in the workspace to the step user, never through a link; but not the
    object files hardlinked from the mirror, which stay the agent's (read-only to all): a
    step owning them could rewrite the mirror's history for every later build."""
    objects = os.path.join(workspace, ".git", "objects") + os.sep

    def own(path: str) -> None:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1 and path.startswith(objects):
            return
        os.lchown(path, user.uid, user.gid)

    def fail(exc: OSError):
        raise exc

    for folder, folders, files in os.walk(workspace, onerror=fail):
        own(folder)
        links = [name for name in folders if os.path.islink(os.path.join(folder, name))]
        for name in files + links:
            own(os.path.join(folder, name))


def _note(source: Source, new: bool, waited, fetching, cloning, submodules=0.0) -> str:
    mirror = "new mirror" if new else "mirror updated"
    wait = f" after waiting {waited:.1f} s for it" if waited >= 0.1 else ""
    note = f"checkout {source.sha[:12]} ({source.ref}): {mirror}{wait}, fetched in {fetching:.2f} s"
    clone = f"shallow clone (depth {source.depth})" if source.depth else "cloned"
    note += f", {clone} in {cloning:.2f} s"
    if source.submodules:
        note += f", submodules in {submodules:.2f} s"
    return note
