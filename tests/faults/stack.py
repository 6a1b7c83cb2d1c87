"""A whole ciproject stack of its own for fault injection: a PostgreSQL cluster and a Redis
server that tests may kill and restart without disturbing the rest of the suite, and web,
controller, beat and agents as real processes on them. Tests act through the HTTP API and
check through SQL, as an operator would."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import redis

from agents.process import containment
from tests.processes import ROOT, Workers, free_port, web_argv
from tests.support import wait_until

# A step command's start: append `job/attempt/name` to $RUNS (a build variable). The same line
# twice is a step attempt run twice.
RECORD = 'echo "$CI_JOB_ID/$CI_STEP_ATTEMPT/{name}" >> "$RUNS"'

FINAL = ("SUCCEEDED", "FAILED", "CANCELED", "QUEUE_TIMEOUT")
RUN_FINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "SKIPPED")


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("the fault suite needs PostgreSQL's server binaries (initdb, pg_ctl)")
    return found[-1].parent


class PostgresServer:
    """A throwaway cluster (trust auth, no fsync). PostgreSQL refuses to run as root, so as
    root it runs as the `postgres` user."""

    def __init__(self, addresses=()):
        self.port = free_port()
        self.addresses = ["127.0.0.1", *addresses]  # where it listens (test hosts' links)
        self.dir = Path(tempfile.mkdtemp(prefix="ciproject-faults-pg-"))
        self.bin = postgres_bin()
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", self.dir / "data", "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")  # fmt: skip
        if addresses:  # the test hosts, on the subnets of its links
            with open(self.dir / "data" / "pg_hba.conf", "a") as hba:
                hba.write("host all all samenet trust\n")

    def _run(self, tool, *args) -> None:
        argv = [*self.as_owner, str(self.bin / tool), *map(str, args)]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses={','.join(self.addresses)}"
            " -c fsync=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", self.dir / "data", "-o", options, "-l", self.dir / "log",
                  "-w", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """mode `immediate` is a crash: every session is cut, recovery runs at the next start."""
        self._run("pg_ctl", "-D", self.dir / "data", "-m", mode, "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """A Redis of its own, keeping nothing on disk, as the machine's: a restart loses every
    message it held."""

    loses_messages = True

    def __init__(self, log_dir: Path, addresses=()):
        self.port, self.log_dir = free_port(), log_dir
        self.addresses = ["127.0.0.1", *addresses]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.log_dir / "redis.log", "ab")  # noqa: SIM115 - lives with the process
        argv = ["redis-server", "--port", str(self.port), "--bind", *self.addresses,
                "--save", "", "--appendonly", "no"]  # fmt: skip
        if len(self.addresses) > 1:  # test hosts' links, on subnets no one else reaches
            argv += ["--protected-mode", "no"]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers():
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(answers, timeout=10, message="redis-server to start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class RabbitBroker:
    """A virtual host of its own on the machine's RabbitMQ. stop() stops the node's broker
    (every connection is cut; durable queues keep their persistent messages, and what was
    delivered but not acknowledged goes back to its queue); start() brings it back."""

    loses_messages = False

    def __init__(self):
        self.vhost = f"ciproject-faults-{os.getpid()}"
        self.url = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"
        # The node may be up with its app still stopped or starting (a restart test before
        # this one, on a busy machine): add_vhost would refuse ("the 'rabbit' app ... not
        # running"), as it did once in CI.
        self.start()
        self._ctl("delete_vhost", self.vhost, check=False)  # a leftover of a killed run
        self._ctl("add_vhost", self.vhost)
        self._ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    @staticmethod
    def _ctl(*args, check=True) -> None:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        if check and done.returncode:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed: is RabbitMQ running on this machine"
                f" (rabbitmq-server -detached)?\n{done.stdout}{done.stderr}"
            )

    def stop(self) -> None:
        self._ctl("stop_app")

    def start(self) -> None:
        self._ctl("start_app")
        self._ctl("await_startup")

    def remove(self) -> None:
        self.start()  # whatever happened, the machine's RabbitMQ is left running
        self._ctl("delete_vhost", self.vhost, check=False)


class Stack(Workers):
    """web, controller, beat and agents on a database and broker of their own."""

    AGENTS = {"fault-1": "linux,default", "fault-2": "linux,default"}

    def __init__(self, database_url: str, broker_url: str, log_dir: Path, agents=None, hosts=None):
        if agents is not None:  # name -> labels, in place of the two default agents
            self.AGENTS = dict(agents)
        # name -> tests.faults.network.Host: the agents that run on a host of their own,
        # reaching the database and the broker at that host's links.
        self.hosts = dict(hosts or {})
        self.work = Path(tempfile.mkdtemp(prefix="ciproject-faults-"))
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "VAR_DIR": str(self.work),
            "PROMETHEUS_MULTIPROC_DIR": str(self.work / "metrics"),
            "AGENT_WORKSPACE_ROOT": str(self.work / "workspaces"),
            "AGENT_HEARTBEAT_SECONDS": "1",
            "AGENT_OFFLINE_AFTER_SECONDS": "8",
            "AGENT_SWEEP_SECONDS": "1",
            "AGENT_DB_RETRY_SECONDS": "120",
            "RECONCILE_SECONDS": "2",
            "JOB_RESEND_AFTER_SECONDS": "3",
            "STEP_KILL_GRACE_SECONDS": "2",
            "CANCEL_WATCHDOG_MARGIN_SECONDS": "2",
            "STEP_LOG_FLUSH_SECONDS": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
        super().__init__(env, log_dir, broker_url=broker_url)
        self.database_url = database_url
        self.web_port = free_port()
        self.token = ""
        self._db: psycopg.Connection | None = None

    # --- setting up ---------------------------------------------------------------------

    def manage(self, *args: str) -> str:
        argv = [sys.executable, "manage.py", *args]
        done = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def prepare(self) -> None:
        self.manage("checkservices", "--create-database")
        self.manage("migrate", "--noinput", "-v0")
        out = self.manage("ensureadmin", "--username", "faults", "--password", "faults")
        self.token = out.split("API token: ", 1)[1].split()[0]

    def start_all(self) -> None:
        self.start_web()
        self.start_controller()
        self.start_beat()
        for name, labels in self.AGENTS.items():
            self.start_agent(name, labels)
        self.wait_ready(["controller", *self.AGENTS])
        self.wait_web()

    def start_web(self) -> None:
        self.start("web", web_argv(f"127.0.0.1:{self.web_port}"))

    def start_agent(self, name: str, labels: str, capacity: int = 1, env=None) -> None:
        host = self.hosts.get(name)
        if host is None:
            return super().start_agent(name, labels, capacity, env)
        urls = {
            "DATABASE_URL": self.database_url.replace("127.0.0.1", host.address["db"]),
            "CELERY_BROKER_URL": self.broker_url.replace("127.0.0.1", host.address["broker"]),
        }
        self.start(
            name, host.command(self.agent_argv(name, labels, capacity)), {**urls, **(env or {})}
        )

    def wait_web(self) -> None:
        def answers():
            self.check_alive()
            try:
                return self.api("GET", "/api/pipelines/")[0] == 200
            except OSError:
                return False

        wait_until(answers, timeout=60, interval=0.2, message="web to answer")

    def restart(self, name: str) -> None:
        if name == "web":
            self.start_web()
            self.wait_web()
        elif name == "controller":
            self.start_controller()
            self.wait_ready([name])
        elif name == "beat":
            self.start_beat()
        else:
            self.start_agent(name, self.AGENTS[name])
            self.wait_ready([name])

    # --- acting and looking -------------------------------------------------------------

    def api(
        self, method: str, path: str, body=None, timeout: float = 10, headers=None
    ) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Token {self.token}",
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def pipeline(self, name: str, definition: str) -> int:
        status, body = self.api("POST", "/api/pipelines/", {"name": name, "definition": definition})
        assert status == 201, body
        return body["id"]

    def trigger(self, pipeline_id: int, **variables) -> dict:
        status, body = self.api(
            "POST", f"/api/pipelines/{pipeline_id}/builds/", {"variables": variables}
        )
        assert status == 201, body
        return body

    def policy(self, name: str, max_running: int, queue_length: int) -> None:
        """A concurrency policy, as an operator saves it in the admin."""
        self.sql(
            "INSERT INTO concurrency_concurrencypolicy (name, group_key, max_running,"
            " queue_length, queue_timeout, on_queue_full, cancel_in_progress)"
            " VALUES (%s, '${pipeline_id}', %s, %s, 3600, 'reject', false)",
            name, max_running, queue_length,
        )  # fmt: skip

    def sql(self, query: str, *args) -> list[tuple]:
        """Run a query on the stack's database, reconnecting once if it was restarted."""
        for attempt in (1, 2):
            try:
                if self._db is None or self._db.closed:
                    self._db = psycopg.connect(self.database_url, autocommit=True)
                cursor = self._db.execute(query, args)
                return cursor.fetchall() if cursor.description else []
            except psycopg.OperationalError:
                self._db = None
                if attempt == 2:
                    raise
        return []

    def wait_final(self, build_ids, timeout: float = 90) -> dict[int, str]:
        ids = list(build_ids)

        def all_final():
            rows = dict(self.sql("SELECT id, status FROM builds_build WHERE id = ANY(%s)", ids))
            return rows if all(s in FINAL for s in rows.values()) else None

        return wait_until(all_final, timeout, interval=0.2, message=f"builds {ids} to end")

    def pids_in(self, database: str) -> list[int]:
        rows = self.sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            database,
        )
        return [pid for (pid,) in rows]

    def stop_all(self) -> None:
        super().stop_all()
        if self._db is not None:
            self._db.close()
        containment.remove_subtrees(Path(self.env["AGENT_WORKSPACE_ROOT"]))
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def holding(stack, query: str, *args):
    """Hold the row locks `query` (a SELECT ... FOR UPDATE) takes until the block ends."""
    with psycopg.connect(stack.database_url) as locker:
        locker.execute(query, args)
        yield locker.info.backend_pid
        locker.rollback()


def wait_blocked_by(stack, locker_pid: int, statement: str = "") -> int:
    """Wait until a session waits on `locker_pid`'s locks (running a statement that starts
    with `statement`, if given); return that session's pid."""

    def blocked():
        rows = stack.sql(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
            " AND query LIKE %s",
            locker_pid, statement + "%",
        )  # fmt: skip
        return rows[0][0] if rows else None

    return wait_until(blocked, timeout=30, message=f"a session to wait on {locker_pid}")


@contextlib.contextmanager
def running_stack(database_url: str, broker_url: str, tmp_path_factory, **options):
    stack = Stack(database_url, broker_url, tmp_path_factory.mktemp("stack-logs"), **options)
    stack.prepare()
    try:
        stack.start_all()
        yield stack
    finally:
        stack.stop_all()


def assert_settled(stack: Stack, runs_file: Path | None = None, timeout: float = 90) -> dict:
    """What every fault test ends with: every build final, nothing of them left queued or
    running, no agent lease or lease wait held, and no step attempt run twice."""

    def settled():
        counts = dict(
            stack.sql(
                "SELECT 'builds', count(*) FROM builds_build WHERE NOT status = ANY(%s)"
                " UNION ALL SELECT 'jobs', count(*) FROM builds_jobrun WHERE NOT status = ANY(%s)"
                " UNION ALL SELECT 'steps', count(*) FROM builds_steprun"
                " WHERE NOT status = ANY(%s)"
                " UNION ALL SELECT 'leases', count(*) FROM agents_agentlease"
                " UNION ALL SELECT 'lease waits', count(*) FROM agents_leasewait",
                list(FINAL), list(RUN_FINAL), list(RUN_FINAL),
            )
        )  # fmt: skip
        return counts if not any(counts.values()) else None

    def left():
        live = "SELECT id, status, reason FROM builds_build WHERE NOT status = ANY(%s)"
        return f"nothing left live; left: {stack.sql(live, list(FINAL))}"

    counts = wait_until(settled, timeout, interval=0.2, message=left)
    if runs_file is not None and runs_file.exists():
        lines = runs_file.read_text().splitlines()
        twice = {line for line in lines if lines.count(line) > 1}
        assert not twice, f"step attempts run more than once: {sorted(twice)}"
    return counts
