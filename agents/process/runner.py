"""Runs one step attempt: a shell command in its own process group, inside its box (its cgroup,
or its group and token: agents.process.containment), as its step user if the agent has one,
its output captured.

The command runs as `bash -eo pipefail -c RUN` in a new session; a timeout, a stop (or, when
the step's main process exits, any process it left behind) is ended by the box: SIGTERM to
all of the step, then SIGKILL (cgroup.kill) after a grace period. Variables reach the step
only through its environment.
"""

import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agents.process import orphans, proctable
from builds.definition import (
    MAX_VARIABLE_NAME,
    MAX_VARIABLE_VALUE,
    MAX_VARIABLES,
    MAX_VARIABLES_TOTAL,
    VARIABLE_NAME_RE,
    is_reserved_variable_name,
)
from vault.masking import Masker

SET_VARIABLE_RE = re.compile(rb"^::set-variable name=([^:]*)::(.*?)\r?$")
# Longer than any valid set-variable line (name and value are capped far below). Output with
# no newline for this long (a binary file, '\r' progress bars) goes to the log in pieces of
# about this size, so memory and CPU stay bounded, and is never parsed as a set-variable.
MAX_LINE = 64 * 1024
# Warnings are appended to the log after its cap: a step printing bad lines in a loop must
# not flood it.
MAX_WARNINGS = 20
# What a step inherits from the agent's environment; nothing else (no DATABASE_URL or keys).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "SHELL", "TMPDIR", "TERM")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SHELL = shutil.which("bash") or "/bin/sh"
SHELL_ARGS = (
    ["--noprofile", "--norc", "-eo", "pipefail", "-c"] if SHELL.endswith("bash") else ["-ec"]
)


@dataclass
class StepOutcome:
    exit_code: int | None
    timed_out: bool = False
    stopped: bool = False
    variables: dict[str, str] = field(default_factory=dict)
    limit_hits: dict[str, int] = field(default_factory=dict)  # cgroup controller: its hits
    cause: str = ""  # why it failed, when its exit code does not say (agents.process.executor)


class StepOutput:
    """Collects a step's output: keeps up to `max_bytes`, counts what it drops, and picks out
    `::set-variable name=KEY::value` lines. Written by the reader thread, drained by the
    runner's loop; once closed it changes no more, even if a reader outlived its step.
    What it keeps has the job's secrets masked (`masker`), a line at a time, so a value split
    across two reads of the pipe is whole when it is masked."""

    def __init__(self, max_bytes: int, masker: Masker | None = None):
        self.max_bytes = max_bytes
        self.masker = masker or Masker()
        self.kept = 0
        self.dropped = 0
        self.variables: dict[str, str] = {}
        self.warnings: list[str] = []
        self._variables_size = 0
        self._unreported = 0  # warnings over MAX_WARNINGS
        self._pending: list[str] = []
        self._partial = b""
        self._overlong = False  # the line in progress already went to the log in pieces
        self._closed = False
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            buffer = self._partial + data
            end = buffer.rfind(b"\n") + 1
            complete, self._partial = buffer[:end], buffer[end:]
            if b"::set-variable" in complete:
                for line in complete[:-1].split(b"\n"):
                    self._line(line + b"\n")
            elif complete:  # no line to pick out: masked and kept at once
                self._overlong = False
                self._keep(self.masker.mask(complete))
            if len(self._partial) > MAX_LINE and (cut := self._safe_cut(self._partial)):
                self._keep(self.masker.mask(self._partial[:cut]))
                self._partial, self._overlong = self._partial[cut:], True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._partial:
                self._line(self._partial)
                self._partial = b""
            if self._unreported:
                self.warnings.append(f"{self._unreported} more set-variable lines ignored")

    def _safe_cut(self, partial: bytes) -> int:
        """Where an overlong line may be cut: never inside a secret. What stays behind (the
        longest secret's length, less one) holds the start of any that is not whole yet."""
        cut = max(len(partial) - max(self.masker.longest - 1, 0), 0)
        for start, end in self.masker.spans(partial):
            if start < cut < end:
                return end
        return cut

    def _line(self, raw: bytes) -> None:
        # The tail of an overlong line is not the start of a line: never a set-variable.
        match = not self._overlong and SET_VARIABLE_RE.match(raw.rstrip(b"\n"))
        self._overlong = False
        if match and self.masker.holds_secret(raw):
            name = self.masker.mask(match.group(1)).decode("utf-8", "replace")
            self._warn(f"{name[:40]}: the line holds a secret, which a variable may not")
        elif match:
            self._set_variable(match.group(1), match.group(2))
        self._keep(self.masker.mask(raw))

    def _keep(self, raw: bytes) -> None:
        room = self.max_bytes - self.kept
        if room <= 0:
            self.dropped += len(raw)
            return
        if len(raw) > room:
            self.dropped += len(raw) - room
            raw = raw[:room]
        self.kept += len(raw)
        # PostgreSQL text cannot hold NUL; invalid UTF-8 becomes U+FFFD.
        self._pending.append(raw.decode("utf-8", "replace").replace("\x00", "\ufffd"))

    def _set_variable(self, raw_name: bytes, raw_value: bytes) -> None:
        name = raw_name.decode("utf-8", "replace")
        value = raw_value.decode("utf-8", "replace").replace("\x00", "\ufffd")
        size = len(value.encode())
        # Counted as builds.definition.normalize_variables counts: name plus value bytes.
        old = self.variables.get(name)
        grows = len(name) + size if old is None else size - len(old.encode())
        if not VARIABLE_NAME_RE.fullmatch(name):
            self._warn(f"{name[:40]!r} is not a valid variable name")
        elif len(name) > MAX_VARIABLE_NAME:
            self._warn(f"{name[:40]}...: name longer than {MAX_VARIABLE_NAME}")
        elif is_reserved_variable_name(name):
            self._warn(f"{name} is reserved (set by the agent, or changes how the shell runs)")
        elif size > MAX_VARIABLE_VALUE:
            self._warn(f"{name} is over {MAX_VARIABLE_VALUE} bytes")
        elif old is None and len(self.variables) >= MAX_VARIABLES:
            self._warn(f"{name}: a step sets at most {MAX_VARIABLES} variables")
        elif self._variables_size + grows > MAX_VARIABLES_TOTAL:
            self._warn(f"{name}: a step's variables total at most {MAX_VARIABLES_TOTAL} bytes")
        else:
            self.variables[name] = value
            self._variables_size += grows

    def _warn(self, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"set-variable ignored: {message}")
        else:
            self._unreported += 1

    def take(self) -> str:
        with self._lock:
            text, self._pending = "".join(self._pending), []
        return text

    def truncation_notice(self) -> str:
        if not self.dropped:
            return ""
        return (
            f"\n[ciproject] log truncated: the first {self.kept} bytes are kept,"
            f" {self.dropped} more bytes were discarded\n"
        )


def step_environment(variables: dict[str, str], ci: dict[str, str]) -> dict[str, str]:
    # Reserved names are refused when set; should one be stored anyway (an older row), it is
    # still data the shell must not see. The agent's basics then override the user's, CI_* last.
    env = {k: v for k, v in variables.items() if not is_reserved_variable_name(k)}
    env.update({k: os.environ[k] for k in INHERITED_ENV if k in os.environ})
    env["PATH"] = os.environ.get("PATH", DEFAULT_PATH)
    env.update(ci)
    return env


def run_step(
    command: str,
    *,
    cwd: str,
    env: dict[str, str],
    timeout: float,
    output: StepOutput,
    grace: float | Callable[[], float],
    on_tick: Callable[[], bool] = lambda: False,
    tick: float = 0.1,
    markers: Path | None = None,
    box=None,
    user=None,
) -> StepOutcome:
    """Run `command` to its end or its timeout. `on_tick` is called about every `tick`
    seconds while it runs (to flush logs); it returns True to stop the step. If it raises,
    the step is ended all the same and the exception propagates. While it runs, the step is
    recorded in `markers` (agents.process.orphans), for a restarted agent to end it. With a
    `box` (agents.process.containment), the step runs in it and ending it ends the box;
    else its process group is ended. With a `user` (agents.process.step_user), it runs as
    that user."""
    argv = [SHELL, *SHELL_ARGS, command]
    if user:
        argv, env = user.argv(argv), user.environment(env)
    popen = {
        "cwd": cwd,
        "env": env,
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "start_new_session": True,
    }
    proc = box.spawn(argv, **popen) if box else subprocess.Popen(argv, **popen)
    token = getattr(box, "token", "")
    marker = orphans.record(markers, proc.pid, token) if markers else None
    stop_reading = threading.Event()
    reader = threading.Thread(target=_read, args=(proc.stdout, output, stop_reading), daemon=True)
    deadline = time.monotonic() + timeout
    timed_out = stopped = False
    try:
        reader.start()
        while True:
            try:
                proc.wait(timeout=tick)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                timed_out = True
                break
            if on_tick():
                stopped = True
                break
    finally:
        # Whatever happened (on_tick raising while PostgreSQL restarts included), what is
        # left of the group (the step itself on timeout or stop, or background processes it
        # left behind) is ended, so no process outlives its step.
        grace = grace() if callable(grace) else grace  # read now: it may depend on why
        try:
            if box:
                box.end(proc, grace)
            else:
                kill_process_group(proc, grace)
        finally:
            if reader.is_alive():
                reader.join(timeout=grace + 1)  # the rest of what the group wrote
            # A process that left the group (setsid) may hold the pipe open for ever: stop
            # reading, which closes our end. (Closing it under a blocked read would not wake
            # the reader, and its fd number could be reused meanwhile.)
            stop_reading.set()
            if reader.is_alive():
                reader.join(timeout=1)
            output.close()
            orphans.forget(marker)
    return StepOutcome(
        exit_code=proc.returncode,
        timed_out=timed_out,
        stopped=stopped,
        variables=dict(output.variables),
        limit_hits=dict(box.hits) if box else {},
    )


def _read(stream, output: StepOutput, stop: threading.Event) -> None:
    fd = stream.fileno()
    poller = select.poll()  # not select(): an agent may hold more than 1024 descriptors
    poller.register(fd, select.POLLIN)
    try:
        while not stop.is_set():
            if not poller.poll(100):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            output.feed(chunk)
    finally:
        stream.close()


def kill_process_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the whole group, then SIGKILL whatever is still there after `grace`."""
    pgid = proc.pid  # start_new_session: the step leads its own group
    if not _signal_group(pgid, signal.SIGTERM):
        proc.poll()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or it lingers as a zombie member of the group
        if not _live_members(pgid):
            return
        time.sleep(0.02)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def _live_members(pgid: int) -> bool:
    """Whether a process of the group is still alive. A killed member whose parent died goes
    to init, which may take a second or two to reap it: a zombie has ended, and counts not."""
    if not os.path.isdir("/proc"):  # not Linux: zombies count
        return _signal_group(pgid, 0)
    return any(proc.pgid == pgid and proc.alive for proc in proctable.processes())


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
