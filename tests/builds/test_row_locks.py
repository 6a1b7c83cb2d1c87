"""Row locks: the services lock builds, jobs and agents FOR NO KEY UPDATE (no key of theirs
ever changes), so the FOR KEY SHARE lock a foreign-key check takes (any insert of a lease,
a log chunk, a variable referencing the row) neither waits for them nor makes them wait:
two builds ending while they hand agents to each other cannot deadlock that way."""

import pytest
from django.db import connection, transaction

from agents import services as agents
from builds import services
from builds.models import Build, JobRun
from dispatch import leases
from tests.support import make_pipeline, one_step, raw_connection

pytestmark = pytest.mark.django_db(transaction=True)  # a second connection holds the lock


def key_share(conn, table: str, row_id: int) -> None:
    """As a foreign-key check of an insert referencing the row does, in an open transaction."""
    conn.execute("BEGIN")
    conn.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR KEY SHARE", [row_id])


@pytest.fixture
def short_lock_waits():
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '2s'")  # a wait fails the test, never hangs it
    yield
    with connection.cursor() as cursor:
        cursor.execute("RESET lock_timeout")


@pytest.mark.usefixtures("short_lock_waits")
def test_advancing_retrying_and_cancelling_a_build_do_not_wait_on_a_key_share():
    build = services.trigger_build(make_pipeline("p", one_step("exit 1", runs_on="unit-tests")))
    job = JobRun.objects.get(build=build)
    with raw_connection() as other:
        key_share(other, "builds_build", build.pk)
        assert services.advance_build(build.pk) == "RUNNING"
        job = services.start_job(job.pk, 1, "a1")
        step = job.steps.get()
        step.job = job
        services.start_step(step)
        services.finish_step(step, 1, "FAILED", 1, {})
        services.finish_job(job, "FAILED")
        assert services.advance_build(build.pk) == "FAILED"
        assert services.retry_step(build.pk, step.pk).attempt == 2
        assert services.request_cancel(build.pk) == "CANCELLING"
        assert services.finish_cancel(build.pk) == "CANCELED"
        other.rollback()
    assert Build.objects.get(pk=build.pk).status == "CANCELED"


@pytest.mark.usefixtures("short_lock_waits")
def test_deciding_an_agents_lease_does_not_wait_on_a_key_share():
    agent = agents.register_agent("a1", "host", ["unit-tests"], 1, "1")
    with raw_connection() as other:
        key_share(other, "agents_agent", agent.pk)
        with transaction.atomic():
            assert leases.lock_agent("a1").pk == agent.pk
        other.rollback()
