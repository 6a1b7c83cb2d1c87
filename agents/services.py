"""Agent registry: registration, heartbeats, draining, and lost agents. An agent is lost
when it stops heartbeating (or starts again while jobs are recorded as running on it): the
jobs it was running end FAILED with a reason naming it, and their builds move on.

Heartbeats are stamped, and their age judged, by the database's clock alone: an agent whose
own clock is behind or ahead is not taken for lost, nor kept alive, by the difference."""

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Func
from django.utils import timezone

import audit
from agents.models import Agent, AgentStatus
from builds.services import agents_left_with_work, fail_jobs_of_lost_agent
from ciproject import metrics
from dispatch import leases


def register_agent(
    name: str,
    hostname: str,
    labels: list[str],
    capacity: int,
    version: str,
    starting=True,
    public_key: str = "",
    containment: str = "",
):
    """An agent's row, created or refreshed. When its process is `starting`, whatever the
    previous process was running is lost. `public_key`: what its secrets are sealed to;
    `containment`: how it contains its steps, in its own words."""
    now = timezone.now()
    if starting:
        fail_jobs_of_lost_agent(name, "restarted while running this job")
    agent, _ = Agent.objects.update_or_create(
        name=name,
        defaults={
            "hostname": hostname,
            "labels": labels,
            "capacity": capacity,
            "version": version,
            "started_at": now,
            "public_key": public_key,
            "containment": containment,
        },
    )
    Agent.objects.filter(pk=agent.pk).update(last_heartbeat=DatabaseNow())
    # A drained agent stays drained across restarts; any other comes back online.
    Agent.objects.filter(pk=agent.pk).exclude(status=AgentStatus.DISABLED).update(
        status=AgentStatus.ONLINE
    )
    agent.refresh_from_db()
    return agent


class DatabaseNow(Func):
    """The database's clock, per statement (not the transaction's start, as now() is)."""

    template = "statement_timestamp()"


def heartbeat(name: str) -> str | None:
    """Record that the agent is alive, bringing it back online if the lost-agent sweep had
    marked it offline; returns its status (None if it is not registered). One statement."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE agents_agent SET last_heartbeat = statement_timestamp(),"
            " status = CASE WHEN status = %s THEN %s ELSE status END"
            " WHERE name = %s RETURNING status",
            [AgentStatus.OFFLINE, AgentStatus.ONLINE, name],
        )
        row = cursor.fetchone()
    return row[0] if row else None


def leased_to(name: str) -> int | None:
    """The build holding the agent's lease, if any."""
    return leases.holder(name)


def status_of(name: str) -> str | None:
    return Agent.objects.filter(name=name).values_list("status", flat=True).first()


def mark_offline(name: str) -> None:
    Agent.objects.filter(name=name, status=AgentStatus.ONLINE).update(status=AgentStatus.OFFLINE)


@transaction.atomic
def set_status(agent: Agent, status: str) -> None:
    """An operator's change: disable (drain) an agent, or put it back online."""
    if Agent.objects.filter(pk=agent.pk).exclude(status=status).update(status=status):
        audit.record("agent.drain" if status == AgentStatus.DISABLED else "agent.undrain", agent)
    agent.status = status


def mark_lost_agents() -> list[str]:
    """Agents whose heartbeat is older than the timeout are lost: online ones go offline
    (drained ones stay disabled), and the jobs they were running fail. Time PostgreSQL itself
    was down does not count: silence is measured from its start at the latest, so the
    first sweep after an outage does not take every agent for lost before it could beat."""
    # One statement, so an agent that heartbeats meanwhile is not taken for lost.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE agents_agent SET status = CASE WHEN status = %s THEN %s ELSE status END"
            " WHERE greatest(last_heartbeat, pg_postmaster_start_time())"
            " < statement_timestamp() - make_interval(secs => %s)"
            " AND status <> %s RETURNING name, status",
            [
                AgentStatus.ONLINE,
                AgentStatus.OFFLINE,
                settings.AGENT_OFFLINE_AFTER_SECONDS,
                AgentStatus.OFFLINE,
            ],
        )
        rows = cursor.fetchall()
    names = [name for name, _ in rows]
    metrics.AGENTS_LOST.inc(sum(status == AgentStatus.OFFLINE for _, status in rows))
    for name in agents_left_with_work(names):
        fail_jobs_of_lost_agent(
            name, f"stopped heartbeating for {settings.AGENT_OFFLINE_AFTER_SECONDS} s"
        )
    # An agent already offline may still be recorded as running a job (a missed sweep).
    offline = Agent.objects.filter(status=AgentStatus.OFFLINE).exclude(name__in=names)
    for name in agents_left_with_work(list(offline.values_list("name", flat=True))):
        fail_jobs_of_lost_agent(name, "is offline")
    return names
