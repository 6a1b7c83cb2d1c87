"""Pipeline secrets: values stored encrypted (vault.crypto), write-only everywhere, given to
the jobs that name them; and the trail of who changed them."""

from django.conf import settings
from django.db import models
from django.db.models import Q

from builds.models import Build, JobRun, Pipeline


class SecretScope(models.Model):
    """Secrets shared by several pipelines (a deploy key, a registry token): staff decide
    which pipelines may use them."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True, default="")
    pipelines = models.ManyToManyField(
        Pipeline,
        blank=True,
        related_name="secret_scopes",
        help_text="The pipelines whose jobs may name this scope's secrets.",
    )

    def __str__(self) -> str:
        return self.name


def owned_by(owner: "Pipeline | SecretScope") -> dict:
    """The Secret field that holds `owner`, as a filter."""
    return {"pipeline": owner} if isinstance(owner, Pipeline) else {"scope": owner}


def owner_label(owner: "Pipeline | SecretScope") -> str:
    """How the trail and messages name an owner: "pipeline web", "scope deploy-keys"."""
    [kind] = owned_by(owner)
    return f"{kind} {owner.name}"


class Secret(models.Model):
    """A pipeline's own secret, or a scope's. Its value is only ever in `ciphertext`."""

    pipeline = models.ForeignKey(
        Pipeline, null=True, blank=True, on_delete=models.CASCADE, related_name="secrets"
    )
    scope = models.ForeignKey(
        SecretScope, null=True, blank=True, on_delete=models.CASCADE, related_name="secrets"
    )
    name = models.CharField(max_length=128)  # a variable name (MAX_VARIABLE_NAME)
    ciphertext = models.BinaryField(editable=False)  # a Fernet token
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(pipeline__isnull=True) ^ Q(scope__isnull=True),
                name="secret_of_a_pipeline_or_a_scope",
            ),
            models.UniqueConstraint(
                fields=["pipeline", "name"],
                condition=Q(pipeline__isnull=False),
                name="secret_name_unique_in_pipeline",
            ),
            models.UniqueConstraint(
                fields=["scope", "name"],
                condition=Q(scope__isnull=False),
                name="secret_name_unique_in_scope",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.owner})"

    @property
    def owner(self) -> str:
        return owner_label(self.pipeline or self.scope)


class SecretEvent(models.Model):
    """The audit trail: names only, never a value."""

    class Action(models.TextChoices):
        SET = "SET"
        REPLACED = "REPLACED"
        DELETED = "DELETED"
        ROTATED = "ROTATED"  # re-encrypted under the first key
        DELIVERED = "DELIVERED"  # given to a job of `build`

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    action = models.CharField(max_length=16, choices=Action.choices)
    name = models.CharField(max_length=128)
    owner = models.CharField(max_length=220)  # "pipeline web", "scope deploy-keys": kept as text
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    source = models.CharField(max_length=16, blank=True, default="")  # api, admin, cli
    build = models.ForeignKey(
        Build, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.action} {self.name} ({self.owner})"


class SealedSecrets(models.Model):
    """A job attempt's secrets, sealed once by the controller for the agent process running
    it (vault.sealing), which takes them before its first step (emptying `sealed`); or why
    it gets none (`error`)."""

    job = models.ForeignKey(JobRun, on_delete=models.CASCADE, related_name="+")
    attempt = models.PositiveIntegerField()
    sealed = models.BinaryField(default=b"")
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    taken_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "attempt"], name="sealed_once_per_attempt")
        ]

    def __str__(self) -> str:
        return f"job {self.job_id} attempt {self.attempt}"
