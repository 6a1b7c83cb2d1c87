"""Where a step's processes live, so that ending a step ends every process it started, however
it left the step's process group.

- cgroup v2, where the agent may create cgroups (a writable cgroup2 mount, or systemd's
  `Delegate=yes`) and they have `cgroup.kill`: each step attempt runs in a cgroup of its own
  under the agent's subtree. Ending it is SIGTERM to every process in it, the grace period,
  then `cgroup.kill`; the step has ended once `cgroup.events` says `populated 0`, and its
  cgroup is then removed. A process in a new session or group, a double-forked daemon, one
  that forks while it is being killed: the kernel counts them all in.
- process group, anywhere else: SIGTERM to the step's group, the grace period, SIGKILL (see
  agents.process.runner). A process that leaves the group (setsid) escapes it.

The agent finds out which at its start (detect) and logs it.
"""

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

EMPTY_WAIT_SECONDS = 10  # after cgroup.kill, how long the kernel gets to empty the cgroup
# The step's first process puts itself in its cgroup, then becomes the step: nothing of the
# step runs before it is in.
ENTER = 'echo $$ > "$0" && exec "$@"'


class CgroupBox:
    """One step attempt's cgroup."""

    def __init__(self, path: Path, new: bool = True):
        self.path = path
        if new:
            path.mkdir()

    def argv(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", ENTER, str(self.path / "cgroup.procs"), *argv]

    def populated(self) -> bool:
        events = (self.path / "cgroup.events").read_text()
        return "populated 1" in events.split("\n")

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def end(self, proc: subprocess.Popen, grace: float) -> None:
        """SIGTERM to everything in the cgroup, `grace` seconds, then cgroup.kill; returns
        once the cgroup is empty and removed."""
        # Stopped right at its start, the step's first process may not be in yet.
        deadline = time.monotonic() + EMPTY_WAIT_SECONDS
        while proc.poll() is None and proc.pid not in self.pids():
            if time.monotonic() >= deadline:
                proc.kill()  # it could not get in: it never ran the step
                break
            time.sleep(0.001)
        if self.populated() and not self._wait_empty(proc, grace, terminate=True):
            self.kill(proc)
        proc.wait()
        self.path.rmdir()

    def kill(self, proc: subprocess.Popen | None = None) -> None:
        """cgroup.kill, and wait until the kernel has emptied the cgroup."""
        (self.path / "cgroup.kill").write_text("1")
        if not self._wait_empty(proc, EMPTY_WAIT_SECONDS):
            raise RuntimeError(f"cgroup {self.path} still populated after cgroup.kill")

    def _wait_empty(self, proc, seconds: float, terminate=False) -> bool:
        """Wait for the cgroup to empty; with `terminate`, SIGTERM each process in it once,
        those forked meanwhile included."""
        deadline, terminated = time.monotonic() + seconds, set()
        while True:
            if proc is not None:
                proc.poll()  # reap the step's first process once it exits
            if not self.populated():
                return True
            if time.monotonic() >= deadline:
                return False
            if terminate:
                for pid in set(self.pids()) - terminated:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                    terminated.add(pid)
            time.sleep(0.005)


class Cgroups:
    """cgroup v2 containment under `subtree`, a cgroup the agent owns."""

    name = "cgroup v2"

    def __init__(self, subtree: Path):
        self.subtree = subtree

    def box(self, name: str) -> CgroupBox:
        return CgroupBox(self.subtree / name)

    def reap(self) -> list[Path]:
        """Kill what is left in the cgroups of this agent's previous life (killed or OOM
        itself, it could not end its steps) and remove them."""
        left = [path for path in self.subtree.iterdir() if path.is_dir()]
        for path in left:
            box = CgroupBox(path, new=False)
            if box.populated():
                box.kill()
            path.rmdir()
        return left

    def close(self) -> None:
        """At the agent's clean end: its subtree goes, if no step is left in it."""
        with contextlib.suppress(OSError):
            self.subtree.rmdir()

    def describe(self) -> str:
        return f"{self.name} ({self.subtree})"


class ProcessGroups:
    """The fallback: the runner ends a step's process group (box None)."""

    name = "process group"

    def __init__(self, why: str):
        self.why = why

    def box(self, name: str) -> None:
        return None

    def reap(self) -> list[Path]:
        return []  # agents.process.orphans does it, by recorded pids

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.name} ({self.why}): a process that leaves the step's group escapes it"


def detect(agent: str, workspace_root: Path, root: str = "") -> "Cgroups | ProcessGroups":
    """The containment this agent can have: cgroup v2 under `root` (AGENT_CGROUP_ROOT), or
    else under the agent's own cgroup, when a trial step can be run and killed there."""
    try:
        subtree = (Path(root) if root else own_cgroup()) / _subtree_name(agent, workspace_root)
        subtree.mkdir(exist_ok=True)
        if not (subtree / "cgroup.kill").exists():
            return ProcessGroups(f"{subtree} has no cgroup.kill (Linux 5.14 or later)")
        cgroups = Cgroups(subtree)
        cgroups.reap()
        _trial(cgroups)
        return cgroups
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return ProcessGroups(f"no cgroup to use: {exc}")


def _subtree_name(agent: str, workspace_root: Path) -> str:
    """One subtree per agent name and installation: two agents never reap each other's."""
    tag = hashlib.sha256(str(workspace_root.resolve()).encode()).hexdigest()[:8]
    return f"ciproject-{agent}-{tag}"


def remove_subtrees(workspace_root: Path, root: str = "") -> list[Path]:
    """Every agent subtree of the installation at `workspace_root`, emptied and removed (for
    tests, and an operator retiring a build node)."""
    try:
        base = Path(root) if root else own_cgroup()
    except OSError:
        return []
    found = list(base.glob(_subtree_name("*", workspace_root)))
    for subtree in found:
        Cgroups(subtree).reap()
        subtree.rmdir()
    return found


def own_cgroup() -> Path:
    """This process's cgroup v2 directory (its line `0::/path` in /proc/self/cgroup, under
    the cgroup2 mount)."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    mount = next((fields[1] for fields in mounts if fields[2] == "cgroup2"), None)
    if mount is None:
        raise OSError("no cgroup2 file system is mounted")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        raise OSError("this process has no cgroup v2 path")
    return Path(mount) / own.lstrip("/")


def _trial(cgroups: Cgroups) -> None:
    box = cgroups.box(f"trial-{os.getpid()}")
    proc = subprocess.Popen(box.argv(["sleep", "5"]), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not (entered := bool(box.pids())) and proc.poll() is None:
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    box.end(proc, 0)
    if not entered:
        raise OSError(f"a process could not enter {box.path}")
