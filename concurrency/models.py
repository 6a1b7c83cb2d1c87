from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from concurrency.keys import validate_template


class OnQueueFull(models.TextChoices):
    REJECT = "reject", "reject the new build (PIPELINE_QUEUE_FULL)"
    EVICT_OLDEST = "evict_oldest", "cancel the oldest queued build"


class ConcurrencyPolicy(models.Model):
    """How many builds of a group may run at once, and how the rest wait. A group is every
    build whose rendered `group_key` is the same, across pipelines too."""

    name = models.CharField(max_length=100, unique=True)
    group_key = models.CharField(
        max_length=200,
        default="${pipeline_id}",
        help_text="Builds with the same rendered key share a group. May use ${pipeline_id}, "
        "${pipeline_name} and build variables, e.g. deploy-${BRANCH}.",
    )
    max_running = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(1000)]
    )
    queue_length = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(0), MaxValueValidator(200)],
        help_text="Builds that may wait in the group's queue (0 to 200).",
    )
    queue_timeout = models.PositiveIntegerField(
        default=3600,
        validators=[MinValueValidator(1), MaxValueValidator(86400)],
        help_text="Seconds a build may wait queued before it ends QUEUE_TIMEOUT (1 to 86400).",
    )
    on_queue_full = models.CharField(
        max_length=16, choices=OnQueueFull.choices, default=OnQueueFull.REJECT
    )
    cancel_in_progress = models.BooleanField(
        default=False,
        help_text="A new build cancels the running and queued builds of its group.",
    )

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "concurrency policies"

    def __str__(self) -> str:
        return self.name

    def clean(self):
        super().clean()
        try:
            validate_template(self.group_key)
        except ValueError as exc:
            raise ValidationError({"group_key": str(exc)}) from None


class ConcurrencyGroup(models.Model):
    """One row per rendered group key: admissions and starts of a group lock it, so they are
    serialized across processes and hosts."""

    key = models.CharField(max_length=400, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.key
