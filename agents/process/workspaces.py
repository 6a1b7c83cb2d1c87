"""Workspaces on the build node: removed whole, and a failed job's kept a while.

A failed job's workspace stays on its agent for AGENT_KEEP_FAILED_WORKSPACE_SECONDS so that a
step retry goes on where the job failed, with what its earlier steps made (the server sends
the retry here: JobRun.kept_workspace_on). Each kept workspace has a marker beside it,
`<workspace>.kept-until` holding a Unix time: the markers are the whole record, so a restarted
agent keeps what is still due and removes the rest."""

import contextlib
import os
import shutil
import stat
import threading
import time
from pathlib import Path

MARKER = ".kept-until"

# claim and prune, so a workspace is never removed as a job takes it; make and the removal of
# a build's folder, so a parallel job's workspace is never made in a folder going away.
_lock = threading.RLock()


def make(workspace: Path, user=None) -> None:
    """The workspace, made if missing, and given to the step user if steps run as one
    (agents.process.step_user); the folders above it stay the agent's."""
    with _lock:  # not while remove() takes the build's folder away
        workspace.mkdir(parents=True, exist_ok=True)
    if user:
        user.own(workspace)


def remove(workspace: Path) -> None:
    """Remove a workspace and all in it, whatever a step did to it (files in folders it made
    read-only included), and its marker if it was kept, then its build's folder once that is
    empty."""
    _marker(workspace).unlink(missing_ok=True)
    if workspace.exists():
        shutil.rmtree(workspace, onerror=_writable_and_again)
    with _lock, contextlib.suppress(OSError):
        workspace.parent.rmdir()


def _writable_and_again(function, path, _exc_info) -> None:
    """rmtree could not remove `path`: its folder (or it) was made read-only. Make them
    writable and try once more; what still fails is left (the next removal tries again)."""
    with contextlib.suppress(OSError):
        parent = os.path.dirname(path)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, os.stat(path).st_mode | stat.S_IRWXU)
            shutil.rmtree(path, onerror=_writable_and_again)
        else:
            function(path)


def _marker(workspace: Path) -> Path:
    return workspace.with_name(workspace.name + MARKER)


def keep(workspace: Path, seconds: float) -> None:
    if workspace.is_dir():  # (a job that failed before it had one leaves nothing to keep)
        _marker(workspace).write_text(f"{time.time() + seconds:.0f}\n")


def claim(workspace: Path) -> bool:
    """A job runs in this workspace again: it is no longer kept (nor pruned under the job).
    True if it is there."""
    with _lock:
        _marker(workspace).unlink(missing_ok=True)
        return workspace.is_dir()


def adopt(root: Path, seconds: float) -> list[Path]:
    """At the agent's start: the workspaces an earlier run of it left without a marker (it
    was killed, or they were its builds' leased ones) are kept as long, then pruned."""
    left = [path for path in root.glob("build-*/*") if path.is_dir() and not _marker(path).exists()]
    for path in left:
        keep(path, seconds)
    return left


def prune(root: Path, now: float | None = None) -> list[Path]:
    """Remove the kept workspaces under `root` whose time is up; returns them."""
    now = time.time() if now is None else now
    removed = []
    with _lock:
        for marker in root.glob(f"build-*/*{MARKER}"):
            try:
                due = float(marker.read_text())
            except (OSError, ValueError):
                due = 0  # unreadable: not worth keeping
            if due > now:
                continue
            workspace = marker.with_name(marker.name.removesuffix(MARKER))
            remove(workspace)
            removed.append(workspace)
    return removed
