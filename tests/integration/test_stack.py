"""The whole stack as `make run` starts it: `make prepare`, then honcho running deploy/Procfile
(web, controller, beat, two agents) on this machine; an example pipeline triggered and
followed through the API; a clean shutdown.

The stack gets its own PostgreSQL database, Redis database, TCP port and VAR_DIR, so this test
runs beside a `make run` stack and beside the rest of the suite (which uses `test_ciproject`
and TEST_BROKER_URL). It needs no pytest-django database: it reads its own database with
psycopg."""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import redis
from django.conf import settings
from psycopg import sql

from tests.conftest import TEST_BROKER_URL
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv the suite runs in, as the Makefile's $(BIN)
AGENTS = ("agent-1", "agent-2")  # deploy/Procfile
PROCFILE_PROCESSES = ("web.1", "controller.1", "beat.1", "agent1.1", "agent2.1")  # honcho's names
BUILD_FINAL = {"SUCCEEDED", "FAILED", "CANCELED", "QUEUE_TIMEOUT"}
PREPARE_TIMEOUT = 180
START_TIMEOUT = 90  # until web answers and both agents are online
BUILD_TIMEOUT = 60
STOP_TIMEOUT = 30  # honcho itself SIGKILLs what is left 5 s after the first process ends
# Environment the stack must not inherit from the test run: make's own (a `make test FOO=x`
# would pass FOO to the child make), and paths that must follow the stack's VAR_DIR
# (ciproject.settings sets PROMETHEUS_MULTIPROC_DIR in this process).
NOT_INHERITED = (
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "PROMETHEUS_MULTIPROC_DIR",
    "STATIC_ROOT",
    "AGENT_WORKSPACE_ROOT",
    "AGENT_STEP_USER",
)


def _database_url(name: str) -> str:
    db = settings.DATABASES["default"]
    user = quote(db.get("USER") or "", safe="")
    password = f":{quote(db['PASSWORD'], safe='')}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{name}"


def _admin_connection():
    db = settings.DATABASES["default"]
    return psycopg.connect(
        host=db.get("HOST") or "127.0.0.1",
        port=db.get("PORT") or 5432,
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
    )


def _broker_url() -> str:
    """The suite's Redis server, a database number below those of all the suite's workers
    (the conftest gives worker gwN the Nth below TEST_BROKER_URL's, 15 by default)."""
    if os.environ.get("STACK_TEST_BROKER_URL"):
        return os.environ["STACK_TEST_BROKER_URL"]
    suite = urlsplit(TEST_BROKER_URL)
    number = int(suite.path.strip("/")) - int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    assert number >= 0, "TEST_BROKER_URL's database number is too low for the stack's"
    return urlunsplit(suite._replace(path=f"/{number}"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stack_services():
    """A database and a Redis database of the stack's own; dropped and flushed at the end,
    whatever happened (WITH (FORCE) ends any session a killed process left behind)."""
    name = f"ciproject_stack_test_{os.getpid()}"
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    broker = redis.Redis.from_url(_broker_url())
    with _admin_connection() as admin:
        admin.execute(drop)
    broker.flushdb()
    try:
        yield name, _broker_url()
    finally:
        with _admin_connection() as admin:
            admin.execute(drop)
        broker.flushdb()
        broker.close()


class Api:
    def __init__(self, base: str, token: str = ""):
        self.base, self.token = base, token

    def request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Token {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read().decode()
            if response.headers.get_content_type() == "application/json":
                return response.status, json.loads(payload)
            return response.status, payload

    def get(self, path: str):
        status, payload = self.request("GET", path)
        assert status == 200, (path, status, payload)
        return payload


def _results(payload):
    return payload["results"] if isinstance(payload, dict) else payload


# Processes, from /proc: pid -> (ppid, process group, start time, state).
def _stat(pid: int):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[2]), int(fields[19]), fields[0]


def _all_processes() -> dict[int, tuple]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdecimal() and (stat := _stat(int(entry))):
            table[int(entry)] = stat
    return table


def _descendants(root: int) -> dict[int, tuple]:
    """The processes started under `root` (honcho's helpers, the Procfile's commands in their
    own sessions, gunicorn's workers): pid -> (ppid, pgid, start time, state)."""
    table = _all_processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, stat in table.items():
            if stat[0] == parent and pid not in found:
                found[pid] = stat
                frontier.append(pid)
    return found


def _still_running(recorded: dict[int, tuple], groups: set[int]) -> list[str]:
    """Those of `recorded` still running, and any other process in one of their `groups`."""
    pids = set(_alive(recorded))
    pids |= {pid for pid, stat in _all_processes().items() if stat[1] in groups and stat[3] != "Z"}
    return [f"pid {pid}: {_cmdline(pid)}" for pid in sorted(pids)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def _alive(recorded: dict[int, tuple]) -> dict[int, tuple]:
    """Those of `recorded` still running: same pid and start time (not a reused pid), and not
    a zombie (it has ended and only waits to be reaped)."""
    now = _all_processes()
    return {
        pid: now[pid]
        for pid, stat in recorded.items()
        if pid in now and now[pid][2] == stat[2] and now[pid][3] != "Z"
    }


def _kill_leftovers(honcho: subprocess.Popen, recorded: dict[int, tuple]) -> None:
    """After a failure: stop what is left of the stack, gently, then for good. Only processes
    started under honcho, each group while one of ours is still in it (its id not reused)."""
    if honcho.poll() is None:
        recorded.update(_descendants(honcho.pid))
        os.kill(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(15)
        except subprocess.TimeoutExpired:
            honcho.kill()
            honcho.wait()
    for pid, stat in _alive(recorded).items():
        for kill, target in ((os.killpg, stat[1]), (os.kill, pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(target, signal.SIGKILL)


def _tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:])


def _prepare(env: dict) -> str:
    """`make prepare`, as `make run` does it (the running venv is the installed one); returns
    the admin's API token, which ensureadmin prints."""
    argv = ["make", "--no-print-directory", "-o", "install", "prepare", f"BIN={BIN}"]
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PREPARE_TIMEOUT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"make prepare failed ({done.returncode}):\n{output}"
    token = re.search(r"^API token: (\w+)", done.stdout, re.MULTILINE)
    assert token, f"make prepare printed no API token:\n{output}"
    return token.group(1)


def _agent_statuses(dbname: str) -> dict[str, str]:
    with psycopg.connect(_database_url(dbname), connect_timeout=5) as conn:
        return dict(conn.execute("SELECT name, status FROM agents_agent").fetchall())


@pytest.fixture
def reachable_workspaces():
    root = Path(tempfile.mkdtemp(prefix="ciproject-stack-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root / "workspaces"
    shutil.rmtree(root)


def test_procfile_stack_runs_a_pipeline_and_stops_cleanly(
    stack_services, tmp_path, reachable_workspaces
):
    dbname, broker_url = stack_services
    port = _free_port()
    greeting = f"hi-{secrets.token_hex(4)}"
    env = {key: value for key, value in os.environ.items() if key not in NOT_INHERITED}
    env.update(
        DATABASE_URL=_database_url(dbname),
        CELERY_BROKER_URL=broker_url,
        VAR_DIR=str(tmp_path / "var"),
        PORT=str(port),
        AGENT_SERVER_URL=f"http://127.0.0.1:{port}",  # as `make run` sets it
        ADMIN_PASSWORD=secrets.token_hex(8),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",  # honcho's output reaches its log file at once
    )
    if os.geteuid() == 0:  # as `make run` does for root: steps as nobody, somewhere it reaches
        env.update(AGENT_STEP_USER="nobody", AGENT_WORKSPACE_ROOT=str(reachable_workspaces))
    started = time.monotonic()
    token = _prepare(env)
    prepared = time.monotonic()

    log_path = tmp_path / "honcho.log"
    argv = [str(BIN / "honcho"), "-d", ".", "-f", "deploy/Procfile", "start", "--port", str(port)]
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    recorded: dict[int, tuple] = {}
    api = Api(f"http://127.0.0.1:{port}", token)
    try:
        # Up: web answers and both agents registered online.
        def stack_up():
            assert honcho.poll() is None, f"honcho exited with {honcho.returncode}"
            try:
                agents = _results(api.get("/api/agents/"))
            except urllib.error.HTTPError:
                raise  # web answers, with an error: fail now, with honcho's output
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False  # web is not listening yet
            return all(
                any(a["name"] == name and a["status"] == "online" for a in agents)
                for name in AGENTS
            )

        wait_until(stack_up, START_TIMEOUT, interval=0.3, message="web and both agents")
        up = time.monotonic()
        recorded.update(_descendants(honcho.pid))

        # An example pipeline through the API.
        pipelines = _results(api.get("/api/pipelines/?limit=500"))
        hello = next(p for p in pipelines if p["name"] == "hello")
        status, build = api.request(
            "POST", f"/api/pipelines/{hello['id']}/builds/", {"variables": {"GREETING": greeting}}
        )
        assert status == 201, build
        assert build["status"] == "RUNNING"

        def finished():
            fresh = api.get(f"/api/builds/{build['id']}/")
            return fresh if fresh["status"] in BUILD_FINAL else None

        build = wait_until(finished, BUILD_TIMEOUT, interval=0.3, message="the hello build")
        assert build["status"] == "SUCCEEDED", json.dumps(build, indent=1)
        jobs = {job["key"]: job for stage in build["stages"] for job in stage["jobs"]}
        assert set(jobs) == {"compile", "lint", "unit"}
        assert {job["agent"] for job in jobs.values()} <= set(AGENTS)
        say = next(step for step in jobs["compile"]["steps"] if step["name"] == "say")
        log_text = api.get(f"/api/builds/{build['id']}/steps/{say['id']}/log/")
        assert f"{greeting} from build {build['number']}" in log_text
        unit = jobs["unit"]["steps"][0]
        log_text = api.get(f"/api/builds/{build['id']}/steps/{unit['id']}/log/")
        assert f"testing version 1.0.{build['number']}" in log_text  # a variable passed on
        # and a file, as an artifact through web (AGENT_SERVER_URL, as `make run` sets it)
        assert f"compile said: {greeting} from build {build['number']}" in log_text
        ran = time.monotonic()

        # Down: SIGTERM to honcho, which passes it on to each process.
        recorded.update(_descendants(honcho.pid))
        groups = {stat[1] for stat in recorded.values()}
        assert len(groups) >= 1 + len(PROCFILE_PROCESSES), recorded  # honcho's + one each
        honcho.send_signal(signal.SIGTERM)
        try:
            honcho.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"honcho did not exit within {STOP_TIMEOUT} s of SIGTERM")
        output = log_path.read_text(errors="replace")
        assert "SIGKILL" not in output, "a process had to be killed: it ignored SIGTERM"
        for name in PROCFILE_PROCESSES:
            assert f"{name} stopped (rc=" in output, f"honcho never saw {name} stop"
        deadline = time.monotonic() + 5  # honcho has waited for each; this is a margin
        while (left := _still_running(recorded, groups)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"processes of the stack outlived honcho: {left}"
        assert _agent_statuses(dbname) == dict.fromkeys(AGENTS, "offline")
        stopped = time.monotonic()
        print(
            f"stack test: prepare {prepared - started:.1f} s, up {up - prepared:.1f} s,"
            f" build {ran - up:.1f} s, shutdown {stopped - ran:.1f} s"
        )
    except BaseException:
        print(f"--- last lines of honcho's output ({log_path}) ---\n{_tail(log_path)}")
        raise
    finally:
        _kill_leftovers(honcho, recorded)
