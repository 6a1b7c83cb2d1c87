"""An agent connected as the role `manage.py agentrole` makes: it runs everything an agent
runs (leases and reuse, set-variable, automatic retries, a step retry, a cancel) with nothing
missing, and the role can read or change nothing agents never touch."""

import os

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command

from builds import services
from builds.models import JobRun, StepRun
from tests.support import make_pipeline, one_step, wait_for_build, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

# Roles are the server's, not a database's: each worker of a parallel run has its own.
ROLE = f"ciagent_test_{os.environ.get('PYTEST_XDIST_WORKER', 'gw0')}"
PASSWORD = "agent-role-password"

LEASED = """
stages:
  - name: build
    jobs:
      - id: compile
        runs-on: role
        steps:
          - run: echo "::set-variable name=ARTIFACT::out-$CI_BUILD_NUMBER" && echo made > a.out
  - name: test
    jobs:
      - id: unit
        runs-on: role
        reuse: compile
        steps:
          - run: test "$ARTIFACT" = "out-$CI_BUILD_NUMBER" && cat a.out
          - run: test -f ../../retried || { touch ../../retried; exit 1; }
            retry: 1
"""


@pytest.fixture
def agent_role(monkeypatch):
    """The role, made by the command; dropped after the test (and after its agent stopped:
    request it first)."""
    monkeypatch.setenv("AGENT_DB_PASSWORD", PASSWORD)
    call_command("agentrole", ROLE)
    db = settings.DATABASES["default"]
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    yield f"postgres://{ROLE}:{PASSWORD}@{host}:{port}/{db['NAME']}"
    with psycopg.connect(host=host, port=port, user=db["USER"], dbname=db["NAME"]) as admin:
        admin.execute(f"DROP OWNED BY {ROLE}")
        admin.execute(f"DROP ROLE {ROLE}")


def test_an_agent_with_its_own_role_runs_every_kind_of_job(agent_role, dedicated, workers):
    dedicated("agent-role", "role", env={"DATABASE_URL": agent_role})
    build = services.trigger_build(make_pipeline("role-leased", LEASED))
    assert wait_for_build(build).status == "SUCCEEDED"  # the second step passed on its retry
    failing = services.trigger_build(make_pipeline("role-fails", one_step("exit 3", "role")))
    assert wait_for_build(failing).status == "FAILED"
    step = StepRun.objects.get(job__build=failing)
    services.retry_step(failing.pk, step.pk)
    assert wait_for_build(failing).status == "FAILED"
    assert StepRun.objects.get(pk=step.pk).attempt == 2
    long = services.trigger_build(make_pipeline("role-cancel", one_step("sleep 600", "role")))
    wait_until(lambda: JobRun.objects.get(build=long).status == "RUNNING")
    services.request_cancel(long.pk)
    assert wait_for_build(long).status == "CANCELED"
    log = (workers.log_dir / "agent-role.log").read_text()
    assert "permission denied" not in log
    assert "agent error" not in log


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM auth_user",
        "SELECT * FROM authtoken_token",
        "SELECT digest, token_key FROM tokens_apitoken",  # API tokens, hashed or not
        "SELECT * FROM tokens_apitoken_pipelines",
        "SELECT definition FROM builds_pipeline",
        "UPDATE concurrency_concurrencypolicy SET max_running = 100",
        "UPDATE builds_build SET status = 'SUCCEEDED'",
        "DELETE FROM builds_steplogchunk",
        "CREATE TABLE agent_was_here (id int)",
    ],
)
def test_the_agent_role_cannot_touch_what_agents_never_touch(agent_role, statement):
    with psycopg.connect(agent_role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_the_agent_role_needs_a_password(monkeypatch):
    monkeypatch.delenv("AGENT_DB_PASSWORD", raising=False)
    with pytest.raises(Exception, match="set the role's password"):
        call_command("agentrole", ROLE)
    assert os.environ.get("AGENT_DB_PASSWORD") is None
