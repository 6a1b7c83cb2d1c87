"""cictl as a user runs it: the installed `cictl` command in a process of its own, with a
clean environment (HOME a fresh folder), against the live test server (`workers`: web,
controller and agents) with a user's API token."""

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User

from tests.support import api_token, wait_until

CICTL = Path(sys.executable).with_name("cictl")  # installed beside this Python (make install)
PERMISSIONS = [
    "view_pipeline", "view_build", "add_build", "cancel_build", "retry_build",
]  # fmt: skip
TIMEOUT = 120  # seconds for one cictl command, --wait included


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cictl:
    def __init__(self, home: Path, url: str, token: str):
        self.home, self.url, self.token = home, url, token

    def env(self, **extra) -> dict:
        """What cictl sees: PATH, HOME and the locale, the server and the token; `extra`
        adds or (with None) removes variables."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "CICTL_URL": self.url,
            "CICTL_TOKEN": self.token,
        }
        env.update(extra)
        return {key: value for key, value in env.items() if value is not None}

    def __call__(self, *args: str, **env) -> Result:
        done = subprocess.run(
            [str(CICTL), *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=self.home,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def start(self, *args: str, **env) -> "Running":
        proc = subprocess.Popen(
            [str(CICTL), *args],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.home,
            # Ctrl-C as in a terminal, even when the suite itself runs in the background
            # (a shell's background job ignores SIGINT, and so would cictl, inheriting it).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        return Running(proc)


class Running:
    """A cictl process whose output is read as it comes (a thread per pipe)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.chunks = {"out": [], "err": []}
        self.readers = [
            threading.Thread(target=self._read, args=(proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, "err"), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, pipe, name: str) -> None:
        for line in iter(pipe.readline, ""):
            self.chunks[name].append(line)

    @property
    def out(self) -> str:
        return "".join(self.chunks["out"])

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        def shown():
            if self.proc.poll() is not None and text not in self.out:
                pytest.fail(f"cictl exited {self.proc.returncode}: {self.chunks}")
            return text in self.out

        wait_until(shown, timeout, message=lambda: f"{text!r} in cictl's output {self.chunks}")

    def result(self, timeout: float = TIMEOUT) -> Result:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for reader in self.readers:
            reader.join(10)
        return Result(code, self.out, "".join(self.chunks["err"]))


def make_user(name: str = "dev", permissions=PERMISSIONS) -> str:
    """A user with these builds permissions; their API token."""
    user = User.objects.create_user(name)
    for codename in permissions:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="builds", codename=codename)
        )
    return api_token(user)


@pytest.fixture
def cictl(workers, worker_env, tmp_path) -> Cictl:
    home = tmp_path / "home"
    home.mkdir()
    return Cictl(home, worker_env["AGENT_SERVER_URL"], make_user())


def normalize(text: str) -> str:
    """Output with what varies from run to run made constant: durations and agents."""
    text = re.sub(r"\b\d+(\.\d)? s\b|\b\d+ m \d\d s\b", "T", text)
    return re.sub(r"\bon agent-\d\b", "on AGENT", text)
