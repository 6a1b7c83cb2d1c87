"""Steps run as a user other than the agent's (`runagent --step-user NAME`): then a step
cannot read the agent's environment (its database URL, keys), its settings files or /proc of
its processes. The switch is made by setpriv (util-linux) as the last thing before the step's
shell, after the step's first process has entered its cgroups (which only the agent may
write): user, group and that user's groups, with no capability left."""

import os
import pwd
import shutil
import subprocess
from pathlib import Path


class StepUserError(Exception):
    pass


class StepUser:
    def __init__(self, name: str):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise StepUserError(f"--step-user {name!r}: no such user on this machine") from None
        if entry.pw_uid == os.geteuid():
            raise StepUserError(f"--step-user {name!r}: that is the agent's own user")
        if entry.pw_uid == 0:
            raise StepUserError(f"--step-user {name!r}: steps may not run as root")
        self.setpriv = shutil.which("setpriv")
        if self.setpriv is None:
            raise StepUserError("--step-user needs setpriv (util-linux) on the PATH")
        self.name, self.uid, self.gid, self.home = name, entry.pw_uid, entry.pw_gid, entry.pw_dir

    def argv(self, argv: list[str]) -> list[str]:
        # Ambient and inheritable capabilities go too: an agent given CAP_SETUID (not root)
        # would otherwise pass it on to the step through setuid between two non-root users.
        return [
            self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
            "--inh-caps=-all", "--ambient-caps=-all", "--", *argv,
        ]  # fmt: skip

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        return {**env, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def own(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)

    def check(self, directory: Path) -> None:
        """At the agent's start: it may switch to the user, and the user can write in a
        workspace under `directory` (every directory above it searchable)."""
        probe = directory / f".step-user-{os.getpid()}"
        probe.mkdir(parents=True, exist_ok=True)
        try:
            self.own(probe)
            script = 'test -w "$0" && test "$(id -u)" = "$1"'
            result = subprocess.run(
                self.argv(["/bin/sh", "-c", script, str(probe), str(self.uid)]),
                capture_output=True, text=True, timeout=30, env={"PATH": os.defpath},
            )  # fmt: skip
        finally:
            probe.rmdir()
        if result.returncode != 0:
            raise StepUserError(
                f"--step-user {self.name}: a step could not run as that user in {directory}"
                f" ({result.stderr.strip() or f'exit code {result.returncode}'}): the agent"
                " needs root or CAP_SETUID and CAP_SETGID, and the user must be able to reach"
                " AGENT_WORKSPACE_ROOT"
            )

    def describe(self) -> str:
        return f"as user {self.name} (uid {self.uid})"
