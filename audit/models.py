from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

from audit.actions import Action


class AuditEvent(models.Model):
    """A state change a person or a token made: who, when, from where, what. Written in the
    transaction of the change (audit.record), never edited. Names only in `details`: never
    the value of a secret or of a variable (one may be secret).

    One table, purged in batches by `at` (audit.retention): at a few events per person-action
    it stays small enough that partitions (as the build variables have) would buy nothing."""

    at = models.DateTimeField(default=timezone.now)
    # The user, while it exists; `username` keeps who it was after the user is deleted.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="audit_events",
        db_index=False,  # the (actor, at) index below serves it
    )
    username = models.CharField(max_length=150)
    token_name = models.CharField(
        max_length=100, blank=True, default="", help_text="'' for a session"
    )
    via = models.CharField(max_length=16, help_text="the door: api, admin or cli")
    address = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=40, choices=Action.choices)
    target_type = models.CharField(max_length=100, blank=True, default="")  # "builds.build"
    target_id = models.CharField(max_length=64, blank=True, default="")
    target_label = models.CharField(max_length=200, blank=True, default="")
    details = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [
            models.Index(fields=["at"], name="audit_at"),
            models.Index(fields=["action", "at"], name="audit_action_at"),
            models.Index(fields=["actor", "at"], name="audit_actor_at"),
            models.Index(fields=["target_type", "target_id"], name="audit_target"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username} {self.action} {self.target_label}"
