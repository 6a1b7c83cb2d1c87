"""Runs one step attempt: a shell command in its own process group, its output captured.

The command runs as `bash -eo pipefail -c RUN` in a new session, so the step and everything
it starts share one process group; a timeout (or, when the step's main process exits, any
process it left behind) is ended by SIGTERM to the whole group, then SIGKILL after a grace
period. Variables reach the step only through its environment.
"""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from builds.definition import MAX_VARIABLE_VALUE, VARIABLE_NAME_RE

SET_VARIABLE_RE = re.compile(rb"^::set-variable name=([^:]*)::(.*?)\r?$")
# What a step inherits from the agent's environment; nothing else (no DATABASE_URL or keys).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "SHELL", "TMPDIR", "TERM")
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


class StepOutput:
    """Collects a step's output: keeps up to `max_bytes`, counts what it drops, and picks out
    `::set-variable name=KEY::value` lines. Written by the reader thread, drained by the
    runner's loop."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.kept = 0
        self.dropped = 0
        self.variables: dict[str, str] = {}
        self.warnings: list[str] = []
        self._pending: list[str] = []
        self._partial = b""
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line + b"\n")

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""

    def _line(self, raw: bytes) -> None:
        match = SET_VARIABLE_RE.match(raw.rstrip(b"\n"))
        if match:
            self._set_variable(match.group(1), match.group(2))
        with self._lock:
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
        if not VARIABLE_NAME_RE.fullmatch(name) or name.upper().startswith("CI_"):
            self.warnings.append(f"set-variable ignored: {name!r} is not a valid variable name")
        elif len(raw_value) > MAX_VARIABLE_VALUE:
            self.warnings.append(f"set-variable ignored: {name} is over {MAX_VARIABLE_VALUE} bytes")
        else:
            self.variables[name] = value

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
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(variables)
    env.update(ci)
    return env


def run_step(
    command: str,
    *,
    cwd: str,
    env: dict[str, str],
    timeout: float,
    output: StepOutput,
    grace: float,
    on_tick: Callable[[], bool] = lambda: False,
    tick: float = 0.1,
) -> StepOutcome:
    """Run `command` to its end or its timeout. `on_tick` is called about every `tick`
    seconds while it runs (to flush logs); it returns True to stop the step."""
    proc = subprocess.Popen(
        [SHELL, *SHELL_ARGS, command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    reader = threading.Thread(target=_read, args=(proc.stdout, output), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    timed_out = stopped = False
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
    # Whatever is left of the group (the step itself on timeout or stop, or background
    # processes it left behind) is ended, so no process outlives its step.
    kill_process_group(proc, grace)
    reader.join(timeout=grace + 1)
    output.close()
    return StepOutcome(
        exit_code=proc.returncode,
        timed_out=timed_out,
        stopped=stopped,
        variables=output.variables,
    )


def _read(stream, output: StepOutput) -> None:
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        output.feed(chunk)
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
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.02)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
