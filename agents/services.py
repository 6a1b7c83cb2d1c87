"""Agent registry: registration, heartbeats, going offline."""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from agents.models import Agent, AgentStatus


def register_agent(name: str, hostname: str, labels: list[str], capacity: int, version: str):
    now = timezone.now()
    agent, _ = Agent.objects.update_or_create(
        name=name,
        defaults={
            "hostname": hostname,
            "labels": labels,
            "capacity": capacity,
            "version": version,
            "started_at": now,
            "last_heartbeat": now,
        },
    )
    # A drained agent stays drained across restarts; any other comes back online.
    Agent.objects.filter(pk=agent.pk).exclude(status=AgentStatus.DISABLED).update(
        status=AgentStatus.ONLINE
    )
    return agent


def heartbeat(name: str) -> bool:
    now = timezone.now()
    updated = Agent.objects.filter(name=name).update(last_heartbeat=now)
    Agent.objects.filter(name=name, status=AgentStatus.OFFLINE).update(status=AgentStatus.ONLINE)
    return bool(updated)


def mark_offline(name: str) -> None:
    Agent.objects.filter(name=name, status=AgentStatus.ONLINE).update(status=AgentStatus.OFFLINE)


def set_status(agent: Agent, status: str) -> None:
    """An operator's change: disable (drain) an agent, or put it back online."""
    Agent.objects.filter(pk=agent.pk).update(status=status)
    agent.status = status


def mark_lost_agents() -> list[str]:
    """Online agents whose heartbeat is older than the timeout go offline."""
    cutoff = timezone.now() - timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS)
    lost = Agent.objects.filter(status=AgentStatus.ONLINE, last_heartbeat__lt=cutoff)
    names = list(lost.values_list("name", flat=True))
    lost.filter(name__in=names).update(status=AgentStatus.OFFLINE)
    return names
