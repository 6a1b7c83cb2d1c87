"""Shared fixtures. Tests run against the real PostgreSQL and Redis; tests marked by using
the `workers` fixture also run a real controller and real agents (`manage.py runagent`)
as separate processes on the test database."""

import os
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from django.conf import settings
from django.core.management import CommandError
from django.core.management.commands import flush
from django.db import OperationalError, connection
from django.utils import timezone

from agents.process import containment
from builds import partitions
from ciproject.celery import app
from tests.processes import Workers, free_port
from tests.support import raw_connection, wait_until


def _broker_url() -> str:
    """The suite's Redis database; in a parallel run (pytest-xdist), worker gwN takes the Nth
    below it (the database names are made apart by pytest-django, VAR_DIR by the settings).
    Written back to the environment, for the tests that choose a database beside it."""
    url = urlsplit(os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/15"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    number = int(url.path.strip("/") or 0) - int(worker.removeprefix("gw"))
    if number < 0:
        raise RuntimeError(f"TEST_BROKER_URL's database number is too low for worker {worker}")
    os.environ["TEST_BROKER_URL"] = urlunsplit(url._replace(path=f"/{number}"))
    return os.environ["TEST_BROKER_URL"]


TEST_BROKER_URL = _broker_url()

AGENTS = {"agent-1": "linux,default", "agent-2": "linux,default,big"}


def pytest_configure(config):
    """The settings of a parallel run's controller set PROMETHEUS_MULTIPROC_DIR (for
    prometheus_client, at var/metrics); its workers must not inherit it, but each take its
    own under its VAR_DIR: else one worker's metrics test counts the other's builds."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


@pytest.fixture(scope="session", autouse=True)
def _flush_survives_deadlocks():
    """A transactional test ends by truncating every table, while the live workers go on
    querying some of them: PostgreSQL may pick the flush as a deadlock's victim. Truncating
    again is safe, so the flush is retried rather than failing the test's teardown."""
    original = flush.Command.handle

    def handle(self, *args, **options):
        for attempt in range(5):
            try:
                return original(self, *args, **options)
            except CommandError as exc:
                cause = exc.__cause__
                if not isinstance(cause, OperationalError) or "deadlock" not in str(cause):
                    raise
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))  # let the other transaction finish

    flush.Command.handle = handle
    yield
    flush.Command.handle = original


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Tests with the real workers run last: once started, the controller and agents consume
    what any later test publishes, and would move on the builds a unit test checks between
    two steps."""
    items.sort(key=lambda item: "workers" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def _services_up():
    """Fail at once, with a clear message, when a service the suite needs is down."""
    db = settings.DATABASES["default"]
    try:
        psycopg.connect(
            host=db["HOST"],
            port=db["PORT"] or 5432,
            user=db["USER"],
            password=db["PASSWORD"],
            dbname="postgres",
            connect_timeout=3,
        ).close()
    except psycopg.OperationalError as exc:
        pytest.exit(f"PostgreSQL at {db['HOST']}:{db['PORT']} is unreachable: {exc}", returncode=3)
    try:
        redis.Redis.from_url(TEST_BROKER_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.exit(f"Redis at {TEST_BROKER_URL} is unreachable: {exc}", returncode=3)
    # Everything this process publishes goes to the test broker, which starts empty.
    app.conf.broker_url = TEST_BROKER_URL
    redis.Redis.from_url(TEST_BROKER_URL).flushdb()


@pytest.fixture(scope="session")
def worker_env(django_db_setup, tmp_path_factory):
    db = settings.DATABASES["default"]
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return {
        # Web, which the agents reach for artifacts (Workers.start_web).
        "AGENT_SERVER_URL": f"http://127.0.0.1:{free_port()}",
        "ARTIFACTS_ROOT": str(tmp_path_factory.mktemp("artifacts")),
        **os.environ,
        "DATABASE_URL": f"postgres://{auth}{host}:{port}/{db['NAME']}",
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "AGENT_WORKSPACE_ROOT": str(tmp_path_factory.mktemp("workspaces")),
        "AGENT_HEARTBEAT_SECONDS": "1",
        "AGENT_OFFLINE_AFTER_SECONDS": "12",  # later than the cancel watchdog (3 + 2 s)
        "AGENT_SWEEP_SECONDS": "1",
        "STEP_KILL_GRACE_SECONDS": "3",
        "CANCEL_WATCHDOG_MARGIN_SECONDS": "2",
        "STEP_LOG_FLUSH_SECONDS": "0.2",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def workers(worker_env, tmp_path_factory, django_db_blocker):
    group = Workers(worker_env, tmp_path_factory.mktemp("worker-logs"))
    group.start_controller()
    group.start_beat()
    group.start_web()
    for name, labels in AGENTS.items():
        group.start_agent(name, labels)
    try:
        group.wait_ready(["controller", *AGENTS])
        group.wait_web()
        yield group
    finally:
        group.stop_all()
        # The agents' cgroup subtrees, with what a killed agent's steps left in them.
        containment.remove_subtrees(Path(worker_env["AGENT_WORKSPACE_ROOT"]))
        with django_db_blocker.unblock():
            _wait_for_sessions_to_close()


def _wait_for_sessions_to_close() -> None:
    """A stopped worker's PostgreSQL sessions end a moment after it: wait for them, so the
    test database can be dropped."""
    name = settings.DATABASES["default"]["NAME"]
    with connection.cursor() as cursor:

        def others_gone():
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            return cursor.fetchone()[0] == 0

        wait_until(others_gone, timeout=20, message="worker database sessions to close")


@pytest.fixture
def no_old_partitions(transactional_db):
    """Each test starts and ends with the partitions migrate made: none in the past."""

    def drop_old():
        today = partitions.bounds_for(timezone.now())[0]
        with raw_connection() as admin:
            for p in partitions.catalog():
                if p.end <= today:
                    admin.execute(f'DROP TABLE "{p.name}"')
            for name in partitions.detached_leftovers():
                admin.execute(f'DROP TABLE "{name}"')

    drop_old()
    yield
    drop_old()


@pytest.fixture
def dedicated(workers):
    """Start agents of the test's own; stop them after it."""
    started = []

    def start(name, labels, capacity=1, env=None, args=()):
        workers.start_agent(name, labels, capacity, env, args)
        workers.wait_ready([name])
        started.append(name)

    yield start
    for name in started:
        if name in workers.procs:
            workers.stop(name)
