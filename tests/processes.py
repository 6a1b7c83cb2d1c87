"""Real ciproject processes for tests: controller, beat, agents and web, each in its own
process group with its output in a log file."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import kombu.exceptions
import pytest
import redis
import requests
from celery import Celery

from ciproject.celery import app
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def web_argv(bind: str) -> list[str]:
    """web as deploy/Procfile runs it (one worker), listening at `bind` (host:port)."""
    return [
        sys.executable, "-m", "gunicorn", "ciproject.asgi:application",
        "--worker-class", "ciproject.web.Worker", "--bind", bind, "--workers", "1",
    ]  # fmt: skip


class Workers:
    """Real worker processes on the broker of `env` (the test broker unless it says)."""

    def __init__(self, env: dict, log_dir: Path, broker_url: str | None = None):
        self.env, self.log_dir = env, log_dir
        # The workers' broker, when it is not this process's: an app of its own pings them.
        self.broker_url = broker_url
        self.app = Celery(broker=broker_url) if broker_url else app
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env=None) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_agent(self, name: str, labels: str, capacity: int = 1, env=None, args=()) -> None:
        self.start(name, [*self.agent_argv(name, labels, capacity), *args], env)

    @staticmethod
    def agent_argv(name: str, labels: str, capacity: int) -> list[str]:
        argv = f"manage.py runagent --name {name} --labels {labels} --capacity {capacity}"
        return [sys.executable, *argv.split()]

    def start_controller(self) -> None:
        argv = (
            "-m celery -A ciproject worker -Q controller -n controller@%h --pool=threads"
            " --concurrency=4 --without-gossip --without-mingle --loglevel=INFO"
        )
        self.start("controller", [sys.executable, *argv.split()])

    def start_beat(self) -> None:
        schedule = self.log_dir / "beat-schedule"
        argv = f"-m celery -A ciproject beat --schedule {schedule}"
        self.start("beat", [sys.executable, *argv.split()])

    def start_web(self) -> None:
        """gunicorn as deploy/Procfile runs it, at the env's AGENT_SERVER_URL."""
        bind = self.env["AGENT_SERVER_URL"].removeprefix("http://")
        self.start("web", web_argv(bind))

    def wait_web(self, timeout: float = 60) -> None:
        def answers():
            self.check_alive()
            try:
                url = f"{self.env['AGENT_SERVER_URL']}/api/agent/artifacts/"
                return requests.get(url, timeout=2).status_code == 401  # no token: ours
            except requests.RequestException:
                return False

        wait_until(answers, timeout, interval=0.2, message="web to answer")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}; see {self.log_dir}")

    def wait_ready(self, names, timeout: float = 60) -> None:
        wanted = {f"{n}@" for n in names}

        def ready():
            self.check_alive()
            try:
                replies = self.app.control.ping(timeout=0.5)
            except (OSError, redis.ConnectionError, kombu.exceptions.OperationalError):
                if self.broker_url:  # its pooled connection died with the broker's restart
                    self.app = Celery(broker=self.broker_url)
                return False
            hosts = {host.split("@")[0] + "@" for reply in replies for host in reply}
            return wanted <= hosts

        wait_until(ready, timeout, interval=0.2, message=f"workers {sorted(names)} to answer")

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children (not the steps an agent runs: each step leads
        a process group of its own), as the kernel's OOM killer or a crash would."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
