"""Where a step's processes live, so that ending a step ends every process it started, however
it left the step's process group, and how far a step may grow.

- cgroup v2, where the agent may create cgroups (a writable cgroup2 mount, or systemd's
  `Delegate=yes`) and they have `cgroup.kill`: each step attempt runs in a cgroup of its own
  under the agent's subtree. Ending it is SIGTERM to every process in it, the grace period,
  then `cgroup.kill`; the step has ended once `cgroup.events` says `populated 0`, and its
  cgroup is then removed. A process in a new session or group, a double-forked daemon, one
  that forks while it is being killed: the kernel counts them all in. Limits (max-processes,
  max-memory) are set with the pids and memory controllers: cgroup v2's where they are
  delegated, else those of cgroup v1 hierarchies mounted beside the cgroup2 one.
- process group and step token, anywhere else: the agent is a child subreaper, so a step's
  orphans become its children rather than init's, and each step attempt's processes carry
  CI_STEP_TOKEN in their environment. Ending the step is SIGTERM, then SIGKILL after the
  grace, to its process group and to every descendant of the agent that carries the token.
  A process that leaves the group and clears the variable (env -i, a daemon that rewrites
  its environment) escapes it. No limits.

The agent finds out which at its start (detect) and logs it.
"""

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agents.process import proctable

log = logging.getLogger(__name__)

EMPTY_WAIT_SECONDS = 10  # after the last kill, how long the kernel gets to end everything
# The step's first process puts itself in its cgroups (the paths of their cgroup.procs up to
# "--"), then becomes the step: nothing of the step runs before it is in.
ENTER = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
TOKEN_VARIABLE = "CI_STEP_TOKEN"
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Limits:
    """A step's limits: processes (pids.max) and memory in bytes; None is no limit."""

    processes: int | None = None
    memory: int | None = None

    def by_controller(self) -> dict[str, int]:
        return {
            name: value
            for name, value in (("pids", self.processes), ("memory", self.memory))
            if value
        }


NO_LIMITS = Limits()
# Each controller's trial at the agent's start: generous, the trial step is `sleep`.
TRIAL_LIMITS = {"pids": Limits(processes=1000), "memory": Limits(memory=1024**3)}
OPTION = {"pids": "max-processes", "memory": "max-memory"}


class LimitUnavailable(Exception):
    """A step asked for a limit this agent cannot enforce: it must not run unlimited."""


# (controller, cgroup version): the limit's file, the events file, the event counted as a hit
FILES = {
    ("pids", 2): ("pids.max", "pids.events", "max"),
    ("pids", 1): ("pids.max", "pids.events", "max"),
    ("memory", 2): ("memory.max", "memory.events", "oom_kill"),
    ("memory", 1): ("memory.limit_in_bytes", "memory.oom_control", "oom_kill"),
}


@dataclass(frozen=True)
class Controller:
    """Where a step's limit of one kind is set: in the step's own cgroup v2 (v1 None), or in
    a cgroup of the same name under `v1`, the agent's subtree in a cgroup v1 hierarchy."""

    name: str  # pids or memory
    v1: Path | None = None

    def directory(self, box: Path) -> Path:
        return self.v1 / box.name if self.v1 else box

    def apply(self, box: Path, value: int) -> None:
        directory = self.directory(box)
        if self.v1:
            directory.mkdir()
        (directory / self._files()[0]).write_text(str(value))
        if self.name == "memory":  # and no swap beyond it, where swap is accounted
            swap = directory / ("memory.memsw.limit_in_bytes" if self.v1 else "memory.swap.max")
            with contextlib.suppress(OSError):
                swap.write_text(str(value) if self.v1 else "0")

    def hits(self, box: Path) -> int:
        _, events, key = self._files()
        for line in (self.directory(box) / events).read_text().splitlines():
            name, _, count = line.partition(" ")
            if name == key:
                return int(count)
        return 0

    def remove(self, box: Path) -> None:
        if self.v1:
            _rmdir(self.directory(box))

    def describe(self) -> str:
        return f"{self.name} (cgroup v1, {self.v1})" if self.v1 else f"{self.name} (cgroup v2)"

    def _files(self) -> tuple[str, str, str]:
        return FILES[(self.name, 1 if self.v1 else 2)]


class CgroupBox:
    """One step attempt's cgroup, with its limits."""

    def __init__(self, path: Path, limits: dict[Controller, int] | None = None, new: bool = True):
        self.path, self.limits = path, limits or {}
        self.hits: dict[str, int] = {}  # after the end: controller name to its hits
        if new:
            path.mkdir()
            try:
                for controller, value in self.limits.items():
                    controller.apply(path, value)
            except OSError:
                self._remove()
                raise

    def argv(self, argv: list[str]) -> list[str]:
        procs = [self.path, *(c.directory(self.path) for c in self.limits if c.v1)]
        enter = [str(directory / "cgroup.procs") for directory in procs]
        return ["/bin/sh", "-c", ENTER, "ciproject-enter", *enter, "--", *argv]

    def spawn(self, argv: list[str], **popen) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **popen)

    def populated(self) -> bool:
        events = (self.path / "cgroup.events").read_text()
        return "populated 1" in events.split("\n")

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def end(self, proc: subprocess.Popen, grace: float) -> None:
        """SIGTERM to everything in the cgroup, `grace` seconds, then cgroup.kill; returns
        once the cgroup is empty and removed (its limits' hits read)."""
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
        self.hits = {c.name: hits for c in self.limits if (hits := c.hits(self.path))}
        self._remove()

    def kill(self, proc: subprocess.Popen | None = None) -> None:
        """cgroup.kill, and wait until the kernel has emptied the cgroup."""
        (self.path / "cgroup.kill").write_text("1")
        if not self._wait_empty(proc, EMPTY_WAIT_SECONDS):
            raise RuntimeError(f"cgroup {self.path} still populated after cgroup.kill")

    def _remove(self) -> None:
        for controller in self.limits:
            controller.remove(self.path)
        self.path.rmdir()

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
    """cgroup v2 containment under `subtree`, a cgroup the agent owns; limits with the
    controllers found (and, for those missing, why)."""

    name = "cgroup v2"

    def __init__(self, subtree: Path):
        self.subtree = subtree
        self.controllers: dict[str, Controller] = {}
        self.missing: dict[str, str] = {}

    def check(self, limits: Limits) -> None:
        """LimitUnavailable unless this agent can enforce every limit of `limits`."""
        for controller in limits.by_controller():
            if controller not in self.controllers:
                raise LimitUnavailable(
                    f"{OPTION[controller]}: this agent cannot enforce it, it has no {controller}"
                    f" cgroup controller ({self.missing.get(controller, 'not looked for')})"
                )

    def box(self, name: str, limits: Limits = NO_LIMITS) -> CgroupBox:
        self.check(limits)
        asked = limits.by_controller()
        return CgroupBox(self.subtree / name, {self.controllers[c]: v for c, v in asked.items()})

    def reap(self) -> list[Path]:
        """Kill what is left in the cgroups of this agent's previous life (killed or OOM
        itself, it could not end its steps) and remove them, with their v1 limit cgroups."""
        left = [path for path in self.subtree.iterdir() if path.is_dir()]
        for path in left:
            box = CgroupBox(path, new=False)
            if box.populated():
                box.kill()
            path.rmdir()
        for controller in self.controllers.values():
            for path in controller.v1.iterdir() if controller.v1 else ():
                if path.is_dir():  # its processes were in a v2 box: they are gone
                    _rmdir(path)
        return left

    def close(self) -> None:
        """At the agent's clean end: its subtrees go, if no step is left in them."""
        for path in [self.subtree, *(c.v1 for c in self.controllers.values() if c.v1)]:
            with contextlib.suppress(OSError):
                path.rmdir()

    def reap_zombies(self) -> None:
        pass  # not a subreaper: orphans go to init

    def describe(self) -> str:
        limits = [c.describe() for c in self.controllers.values()]
        limits += [f"no {name}: {why}" for name, why in self.missing.items()]
        return f"{self.name} ({self.subtree}); limits: {'; '.join(limits)}"


# The first processes of this process's running steps (TokenBox): their Popen waits for them,
# so reap_zombies must not. Held while a step is spawned, so none is reaped before it is known.
_leaders: set[int] = set()
_leaders_lock = threading.Lock()


class TokenBox:
    """One step attempt without a cgroup: its process group and the descendants of this
    process (a subreaper) that carry the attempt's token."""

    def __init__(self):
        self.token = secrets.token_hex(16)
        self.entry = f"{TOKEN_VARIABLE}={self.token}".encode()
        self.hits: dict[str, int] = {}

    def spawn(self, argv: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
        with _leaders_lock:
            proc = subprocess.Popen(argv, env={**env, TOKEN_VARIABLE: self.token}, **popen)
            _leaders.add(proc.pid)
        return proc

    def members(self, leader: int) -> list[int]:
        mine = proctable.descendants(os.getpid(), proctable.processes())
        return [
            proc.pid
            for proc in mine
            if proc.alive and (proc.pgid == leader or self.entry in proctable.environment(proc.pid))
        ]

    def end(self, proc: subprocess.Popen, grace: float) -> None:
        """SIGTERM to every member, those found meanwhile included, SIGKILL after `grace`;
        returns once none is left."""
        seen: set[int] = set()
        try:
            if not self._signal_until_gone(proc, signal.SIGTERM, grace, seen):
                self._signal_until_gone(proc, signal.SIGKILL, EMPTY_WAIT_SECONDS, seen)
            proc.wait()
        finally:
            with _leaders_lock:
                _leaders.discard(proc.pid)
        for pid in seen:  # orphans of the step, now ours: reap them
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def _signal_until_gone(self, proc, sig, seconds, seen: set[int]) -> bool:
        """Send `sig` once to each member, new ones too, until none is left (True) or
        `seconds` have passed (False; after SIGKILL, an error). `seen` gathers them."""
        deadline, signalled, empty_scans = time.monotonic() + seconds, set(), 0
        while True:
            proc.poll()  # the step's first process, once it exits
            members = self.members(proc.pid)
            # A process in the middle of an exec shows no environment for a moment: gone
            # only once two scans apart find nothing.
            empty_scans = 0 if members else empty_scans + 1
            if empty_scans == 2:
                return True
            if time.monotonic() >= deadline:
                if sig == signal.SIGKILL:
                    raise RuntimeError(f"step processes {members} still alive after SIGKILL")
                return False
            for pid in set(members) - signalled:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                signalled.add(pid)
            seen.update(members)
            time.sleep(0.01 if members else 0.001)


class ProcessGroups:
    """The fallback (TokenBox): no cgroups, so no limits."""

    name = "process group and step token"

    def __init__(self, why: str):
        self.why = why

    def check(self, limits: Limits) -> None:
        if asked := limits.by_controller():
            raise LimitUnavailable(
                f"{', '.join(OPTION[c] for c in asked)}: this agent cannot enforce it, it has"
                f" no cgroups ({self.why})"
            )

    def box(self, name: str, limits: Limits = NO_LIMITS) -> TokenBox:
        self.check(limits)
        return TokenBox()

    def reap(self) -> list[Path]:
        return []  # agents.process.orphans does it, by recorded pids and tokens

    def close(self) -> None:
        pass

    def reap_zombies(self) -> None:
        """Reap orphans of steps that ended on their own (they became this subreaper's
        children), never a step's first process."""
        with _leaders_lock:
            for proc in proctable.processes():
                if proc.ppid == os.getpid() and not proc.alive and proc.pid not in _leaders:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(proc.pid, os.WNOHANG)

    def describe(self) -> str:
        return (
            f"{self.name} ({self.why}): a process that leaves the step's group and drops"
            f" {TOKEN_VARIABLE} from its environment escapes it; no max-processes or max-memory"
        )


def detect(agent: str, workspace_root: Path, root: str = "") -> "Cgroups | ProcessGroups":
    """The containment this agent can have: cgroup v2 under `root` (AGENT_CGROUP_ROOT), or
    else under the agent's own cgroup, when a trial step can be run and killed there; else
    the fallback, for which this process becomes a child subreaper."""
    try:
        subtree = (Path(root) if root else own_cgroup()) / _subtree_name(agent, workspace_root)
        subtree.mkdir(exist_ok=True)
        if not (subtree / "cgroup.kill").exists():
            return _fallback(f"{subtree} has no cgroup.kill (Linux 5.14 or later)")
    except OSError as exc:
        return _fallback(f"no cgroup to use: {exc}")
    cgroups = Cgroups(subtree)
    for name in TRIAL_LIMITS:
        try:
            cgroups.controllers[name] = _v2_controller(subtree, name) or _v1_controller(
                name, subtree.name
            )
        except OSError as exc:
            cgroups.missing[name] = str(exc)
    try:
        cgroups.reap()  # what its previous life left, v1 limit cgroups included
        _trial(cgroups, NO_LIMITS)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        cgroups.close()
        return _fallback(f"no cgroup to use: {exc}")
    for name in list(cgroups.controllers):
        try:
            _trial(cgroups, TRIAL_LIMITS[name])
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            del cgroups.controllers[name]
            cgroups.missing[name] = str(exc)
    return cgroups


def _fallback(why: str) -> ProcessGroups:
    try:
        subreaper = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        subreaper = False
    if not subreaper:
        why += "; not a subreaper either: orphans of a step go to init, out of its reach"
    return ProcessGroups(why)


def _words(path: Path) -> list[str]:
    return path.read_text().split()


def _v2_controller(subtree: Path, name: str) -> Controller | None:
    """cgroup v2's own controller, enabled for the steps' cgroups, if it is delegated."""
    if name not in _words(subtree / "cgroup.controllers"):
        parent = subtree.parent  # the agent's own cgroup: enable it there, if ours to
        if name not in _words(parent / "cgroup.controllers"):
            return None
        with contextlib.suppress(OSError):  # it has processes of its own, or is not ours
            (parent / "cgroup.subtree_control").write_text(f"+{name}")
        if name not in _words(subtree / "cgroup.controllers"):
            return None
    if name not in _words(subtree / "cgroup.subtree_control"):
        (subtree / "cgroup.subtree_control").write_text(f"+{name}")
    return Controller(name)


def _v1_controller(name: str, subtree_name: str) -> Controller:
    """The controller's cgroup v1 hierarchy, where one is mounted: the agent's subtree there."""
    base = _v1_own_cgroup(name) / subtree_name
    base.mkdir(exist_ok=True)
    return Controller(name, base)


def _v1_own_cgroup(name: str) -> Path:
    """This process's own cgroup in the cgroup v1 hierarchy of controller `name`."""
    mount = next((m[1] for m in _mounts() if m[2] == "cgroup" and name in m[3].split(",")), None)
    if mount is None:
        raise OSError(
            f"cgroup v2 does not delegate {name} here, and no cgroup v1 {name} hierarchy is mounted"
        )
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = next(
        (f[2] for f in (line.split(":", 2) for line in lines) if name in f[1].split(",")), "/"
    )
    return Path(mount) / own.lstrip("/")


def _mounts() -> list[list[str]]:
    return [line.split() for line in Path("/proc/mounts").read_text().splitlines()]


def _rmdir(path: Path) -> None:
    """Remove an empty cgroup; a v1 one may hold its last exiting task for a moment."""
    deadline = time.monotonic() + EMPTY_WAIT_SECONDS
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _subtree_name(agent: str, workspace_root: Path) -> str:
    """One subtree per agent name and installation: two agents never reap each other's."""
    tag = hashlib.sha256(str(workspace_root.resolve()).encode()).hexdigest()[:8]
    return f"ciproject-{agent}-{tag}"


def remove_subtrees(workspace_root: Path, root: str = "") -> list[Path]:
    """Every agent subtree of the installation at `workspace_root` (cgroup v2 and the v1
    limit hierarchies), emptied and removed (for tests, and an operator retiring a node)."""
    try:
        base = Path(root) if root else own_cgroup()
    except OSError:
        return []
    found = list(base.glob(_subtree_name("*", workspace_root)))
    for subtree in found:
        Cgroups(subtree).reap()
        subtree.rmdir()
    for name in ("pids", "memory"):
        with contextlib.suppress(OSError):
            v1_base = _v1_own_cgroup(name)
            for subtree in v1_base.glob(_subtree_name("*", workspace_root)):
                for path in [*subtree.iterdir(), subtree]:
                    if path.is_dir():
                        _rmdir(path)
    return found


def own_cgroup() -> Path:
    """This process's cgroup v2 directory (its line `0::/path` in /proc/self/cgroup, under
    the cgroup2 mount)."""
    mount = next((fields[1] for fields in _mounts() if fields[2] == "cgroup2"), None)
    if mount is None:
        raise OSError("no cgroup2 file system is mounted")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        raise OSError("this process has no cgroup v2 path")
    return Path(mount) / own.lstrip("/")


def _trial(cgroups: Cgroups, limits: Limits) -> None:
    box = cgroups.box(f"trial-{os.getpid()}", limits)
    proc = box.spawn(["sleep", "5"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not (entered := bool(box.pids())) and proc.poll() is None:
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    box.end(proc, 0)
    if not entered:
        raise OSError(f"a process could not enter {box.path}")
