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
    # How its steps are contained, as its process found out at its start (cgroup v2 with
    # its limits, or the fallback and what escapes it).
    containment = models.TextField(blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # Its process's X25519 key (base64): secrets are sealed to it (vault.sealing).
    public_key = models.CharField(max_length=64, blank=True, default="")
    # Set when the agent failed to confirm a stop in time: look at the machine.
    suspect_since = models.DateTimeField(null=True, blank=True)
    suspect_reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class AgentLease(models.Model):
    """An agent held by a build whose later jobs reuse it. One row per agent at most (the
    unique agent is the exclusion, whatever the concurrency of placements)."""

    agent = models.OneToOneField(Agent, on_delete=models.CASCADE, related_name="lease")
    build = models.ForeignKey("builds.Build", on_delete=models.CASCADE, related_name="leases")
    acquired_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.agent} leased to build {self.build_id}"


class LeaseWait(models.Model):
    """A job that must run on an agent leased to another build: it waits, first come first
    served, until the lease is released (or LEASE_WAIT_TIMEOUT_SECONDS pass)."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="lease_waits")
    build = models.ForeignKey("builds.Build", on_delete=models.CASCADE, related_name="+")
    job = models.OneToOneField("builds.JobRun", on_delete=models.CASCADE, related_name="+")
    since = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["since", "id"]

    def __str__(self) -> str:
        return f"job {self.job_id} waits for {self.agent}"
