from django.db import models


class AgentStatus(models.TextChoices):
    ONLINE = "online"
    OFFLINE = "offline"
    DISABLED = "disabled"


class Agent(models.Model):
    """A build node: one `manage.py runagent` process (a Celery worker)."""

    name = models.CharField(max_length=100, unique=True)
    hostname = models.CharField(max_length=255, blank=True, default="")
    labels = models.JSONField(default=list)
    capacity = models.PositiveSmallIntegerField(default=1, help_text="Jobs it runs at once.")
    status = models.CharField(
        max_length=16, choices=AgentStatus.choices, default=AgentStatus.ONLINE
    )
    version = models.CharField(max_length=32, blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # Set when the agent failed to confirm a stop in time: look at the machine.
    suspect_since = models.DateTimeField(null=True, blank=True)
    suspect_reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
