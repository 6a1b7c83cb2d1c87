"""Steps that outlive their agent. A step leads a process group of its own, so an agent that
is killed (the OOM killer, SIGKILL) leaves its running step behind, still doing what it did
(a deploy, say) for a job the server has since ended. Each running step is recorded by a file
in the agent's directory (its first process, and the attempt's token where the step has one:
agents.process.containment.TokenBox); a restarted agent kills what its previous life left
there before it takes a job. (In cgroups, the restarted agent kills what is left in them.)"""

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from django.conf import settings

from agents.process import proctable
from agents.process.containment import TOKEN_VARIABLE

log = logging.getLogger(__name__)


def directory(agent: str) -> Path:
    return Path(settings.AGENT_WORKSPACE_ROOT) / agent / ".steps"


def record(directory: Path, pid: int, token: str = "") -> Path | None:
    proc = proctable.read(pid)
    if proc is None:  # gone already, or no /proc: nothing to find later
        return None
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / str(pid)
    marker.write_text(f"{proc.start_time} {token}".strip())
    return marker


def forget(marker: Path | None) -> None:
    if marker is not None:
        marker.unlink(missing_ok=True)


def reap(directory: Path) -> list[int]:
    """Kill the process groups of steps recorded in `directory` that are still running, and
    every process that carries one of their tokens (the agent that was their subreaper is
    gone: they are anyone's children now)."""
    killed, tokens = [], set()
    for marker in directory.glob("*") if directory.is_dir() else ():
        pid = int(marker.name) if marker.name.isdigit() else None
        started, _, token = marker.read_text().partition(" ")
        if token:
            tokens.add(f"{TOKEN_VARIABLE}={token}".encode())
        proc = proctable.read(pid) if pid else None
        if proc and proc.start_time == started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
                log.warning("killed step process group %s, left running by a previous run", pid)
        marker.unlink(missing_ok=True)
    # Scanned until a scan finds no more: a process in the middle of an exec shows no
    # environment for a moment.
    while tokens and (carriers := _carriers(tokens)):
        for pid in carriers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                log.warning("killed process %s of a step left running by a previous run", pid)
        time.sleep(0.01)
    return killed


def _carriers(tokens: set[bytes]) -> list[int]:
    table = proctable.processes()
    return [proc.pid for proc in table if proc.alive and tokens & proctable.environment(proc.pid)]
