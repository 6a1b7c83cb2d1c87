"""Steps that outlive their agent. A step leads a process group of its own, so an agent that
is killed (the OOM killer, SIGKILL) leaves its running step behind, still doing what it did
(a deploy, say) for a job the server has since ended. Each running step is recorded by a file
in the agent's directory; a restarted agent kills what its previous life left there before
it takes a job."""

import contextlib
import logging
import os
import signal
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)


def directory(agent: str) -> Path:
    return Path(settings.AGENT_WORKSPACE_ROOT) / agent / ".steps"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names one
    process, not a later one that reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def record(directory: Path, pid: int) -> Path | None:
    started = _start_time(pid)
    if started is None:  # gone already, or no /proc: nothing to find later
        return None
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / str(pid)
    marker.write_text(started)
    return marker


def forget(marker: Path | None) -> None:
    if marker is not None:
        marker.unlink(missing_ok=True)


def reap(directory: Path) -> list[int]:
    """Kill the process groups of steps recorded in `directory` that are still running."""
    killed = []
    for marker in directory.glob("*") if directory.is_dir() else ():
        pid = int(marker.name) if marker.name.isdigit() else None
        if pid and _start_time(pid) == marker.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
                log.warning("killed step process group %s, left running by a previous run", pid)
        marker.unlink(missing_ok=True)
    return killed
