"""Workspaces of failed jobs, kept on their agent for AGENT_KEEP_FAILED_WORKSPACE_SECONDS so
that a step retry goes on where the job failed, with what its earlier steps made (the server
sends the retry here: JobRun.kept_workspace_on). Each kept workspace has a marker beside it,
`<workspace>.kept-until` holding a Unix time: the markers are the whole record, so a restarted
agent keeps what is still due and removes the rest."""

import contextlib
import shutil
import threading
import time
from pathlib import Path

MARKER = ".kept-until"

_lock = threading.Lock()  # claim and prune, so a workspace is never removed as a job takes it


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
            shutil.rmtree(workspace, ignore_errors=True)
            marker.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the build's folder, once empty
                workspace.parent.rmdir()
            removed.append(workspace)
    return removed
