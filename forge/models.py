"""A pipeline's repository on a forge (webhooks in, commit statuses out), the statuses owed
to it, and the pipeline's cron schedules."""

from django.db import models

from builds.models import Build, Pipeline


class Forge(models.TextChoices):
    GITHUB = "github", "GitHub"
    GITLAB = "gitlab", "GitLab"
    GITEA = "gitea", "Gitea / Forgejo"


class Repository(models.Model):
    """Where a pipeline's code lives. Credentials are the names of the pipeline's secrets
    (vault), never values; the webhook secret is encrypted like a secret (vault.crypto)."""

    pipeline = models.OneToOneField(Pipeline, on_delete=models.CASCADE, related_name="repository")
    forge = models.CharField(max_length=16, choices=Forge.choices)
    clone_url = models.CharField(max_length=500, help_text="https://, http:// or git:// URL.")
    default_branch = models.CharField(max_length=255, default="main")
    api_url = models.CharField(
        max_length=500,
        blank=True,
        default="",
        help_text="The forge's API root; empty: derived from the clone URL (api.github.com "
        "for github.com, /api/v3 for GitHub Enterprise, the host for GitLab and Gitea).",
    )
    clone_username = models.CharField(
        max_length=100,
        blank=True,
        default="",
        help_text="The user name git gives with the clone secret; empty: the forge's "
        "convention for a token (x-access-token, oauth2).",
    )
    clone_secret = models.CharField(
        max_length=128,
        blank=True,
        default="",
        help_text="The name of the pipeline's secret holding the password or token to clone "
        "with; empty for a public repository.",
    )
    status_secret = models.CharField(
        max_length=128,
        blank=True,
        default="",
        help_text="The name of the pipeline's secret holding the API token commit statuses "
        "are posted with; empty: no statuses.",
    )
    # Fernet token of the webhook secret: shown once when made, never again.
    webhook_secret = models.BinaryField(editable=False)
    webhook_secret_set_at = models.DateTimeField(editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "repositories"

    def __str__(self) -> str:
        return f"{self.pipeline.name}: {self.clone_url}"

    @property
    def git_username(self) -> str:
        """The user name git gives with the clone secret: what each forge takes for a token
        given as a password, unless one is set."""
        return self.clone_username or {Forge.GITHUB: "x-access-token"}.get(self.forge, "oauth2")


class CommitStatus(models.Model):
    """The status a build of a repository owes its commit on the forge. The controller
    posts the build's current state whenever it differs from what was delivered, with
    backoff after a failure (forge.services.statuses); builds never wait on it."""

    build = models.OneToOneField(Build, on_delete=models.CASCADE, related_name="commit_status")
    repository = models.ForeignKey(Repository, on_delete=models.CASCADE, related_name="statuses")
    # The build status last delivered ("" before the first), and whether there is nothing
    # more to deliver (the final one went out, or was given up).
    delivered = models.CharField(max_length=16, blank=True, default="")
    done = models.BooleanField(default=False)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)  # failed ones, since the last success
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_state = models.CharField(max_length=16, blank=True, default="")  # the forge's
    last_http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        verbose_name_plural = "commit statuses"
        indexes = [
            models.Index(
                fields=["next_attempt_at"], name="status_pending", condition=models.Q(done=False)
            )
        ]

    def __str__(self) -> str:
        return f"{self.build}: {self.last_state or 'not sent'}"


class Schedule(models.Model):
    """A pipeline's cron schedule: from its YAML (`schedules:`, kept in step by beat) or
    made in the admin. Each tick fires at most once: the tick is the build's idempotency
    key."""

    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="schedules")
    cron = models.CharField(max_length=200, help_text="minute hour day month weekday")
    timezone = models.CharField(max_length=64, default="UTC", help_text="An IANA time zone.")
    branch = models.CharField(
        max_length=255, blank=True, default="", help_text="Empty: the repository's default."
    )
    variables = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)
    # A schedule of the pipeline's YAML: its place there, and made, changed and removed
    # with the definition (the admin does not edit those).
    from_definition = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_tick = models.DateTimeField(null=True, blank=True, editable=False)
    last_build = models.ForeignKey(
        Build, null=True, blank=True, on_delete=models.SET_NULL, editable=False, related_name="+"
    )
    last_error = models.TextField(blank=True, default="", editable=False)

    class Meta:
        ordering = ["pipeline", "id"]

    def __str__(self) -> str:
        return f"{self.pipeline.name}: {self.cron} ({self.timezone})"
