"""Running git with a credential that never reaches a command line, a config file or a log:
git asks our askpass script, which prints what the git process's own environment holds.
The script holds nothing; the values live only in that one process's environment."""

import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path

ASKPASS = """#!/bin/sh
case "$1" in
  Username*) printf '%s\\n' "$CIPROJECT_GIT_USERNAME" ;;
  *) printf '%s\\n' "$CIPROJECT_GIT_PASSWORD" ;;
esac
"""


@cache
def askpass() -> str:
    """The script's path, written once per process into a folder of its own."""
    folder = Path(tempfile.mkdtemp(prefix="ciproject-git-"))
    script = folder / "askpass"
    script.write_text(ASKPASS)
    script.chmod(0o700)
    return str(script)


def environment(credentials: dict | None, home: str | None = None) -> dict[str, str]:
    """What git runs with: nothing of the host's git configuration, no prompt on a terminal,
    and the credential (if any) for the askpass script alone."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home or tempfile.gettempdir(),
        "LANG": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": askpass(),
        "SSH_ASKPASS": askpass(),
    }
    if credentials:
        env["CIPROJECT_GIT_USERNAME"] = credentials.get("username", "")
        env["CIPROJECT_GIT_PASSWORD"] = credentials.get("password", "")
    return env


def run(args: list[str], credentials: dict | None, timeout: float, cwd=None):
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=environment(credentials),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def message(done: subprocess.CompletedProcess, credentials: dict | None) -> str:
    """git's own words for why it failed, trimmed, the password masked should it echo it."""
    text = (done.stderr or done.stdout or f"exit code {done.returncode}").strip()
    password = (credentials or {}).get("password")
    if password:
        text = text.replace(password, "***")
    return text[-1000:]
