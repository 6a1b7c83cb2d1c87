"""API tokens: hashed, named, scoped, expiring.

On django-rest-knox: its AbstractAuthToken (digest, readable token_key, owner, created,
expiry), its token string (random hex behind a prefix) and its hashing (SHA-512 of the
value; a 256-bit random value needs no slow hash) are kept. Its authentication class is
not: it deletes an expired token when it is presented (we keep the row, answer
TOKEN_EXPIRED and show it in the admin), it knows no revocation, last use or scope. Ours is
in tokens.authentication. The digest is no longer the primary key (the API and the admin
name a token by a plain id), which is why the field is redeclared here."""

from datetime import timedelta

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q
from django.utils import timezone
from knox.models import AbstractAuthToken
from knox.settings import CONSTANTS

# The scope's vocabulary. "read": safe methods only, and every token has it; "staff":
# server-wide changes (policies, agents, partitions). tokens.permissions maps each API
# action to one of these.
ACTIONS = ("read", "trigger", "cancel", "retry", "edit", "staff")
# Acting on no pipeline in particular (creating one) is outside a pipeline-limited token.
PIPELINE_ACTIONS = ("trigger", "cancel", "retry", "edit")
PREFIX_LENGTH = CONSTANTS.TOKEN_KEY_LENGTH  # characters of the value kept readable
USED_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often per token


class Kind(models.TextChoices):
    PERSONAL = "personal"  # a person's own
    SERVICE = "service"  # a service account's (a user staff made for a machine)


class ApiToken(AbstractAuthToken):
    # Not knox's manager, whose create() makes a token past tokens.services' checks.
    objects = models.Manager()

    id = models.BigAutoField(primary_key=True)
    digest = models.CharField(max_length=CONSTANTS.DIGEST_LENGTH, unique=True, editable=False)
    token_key = models.CharField(
        "prefix",
        max_length=CONSTANTS.MAXIMUM_TOKEN_PREFIX_LENGTH + CONSTANTS.TOKEN_KEY_LENGTH,
        db_index=True,
        editable=False,
        help_text="the value's first characters: enough to recognise it, not to use it",
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, models.CASCADE, related_name="api_tokens", verbose_name="owner"
    )
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.PERSONAL)
    actions = ArrayField(
        models.CharField(max_length=16, choices=[(a, a) for a in ACTIONS]), default=list
    )
    pipelines = models.ManyToManyField(
        "builds.Pipeline",
        blank=True,
        related_name="+",
        help_text="the only pipelines it reaches; none: every pipeline its owner may",
    )
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # A DRF authtoken key moved here by migration 0002: no expiry until it is rotated.
    legacy = models.BooleanField(default=False)

    class Meta:
        verbose_name = "API token"
        ordering = ["-created"]
        constraints = [
            # A revoked token's name may be taken again (rotation does).
            models.UniqueConstraint(
                fields=["user", "name"],
                condition=Q(revoked_at__isnull=True),
                name="tokens_name_unique_per_owner",
            ),
            models.CheckConstraint(
                condition=Q(expiry__isnull=False) | Q(legacy=True),
                name="tokens_expiry_unless_legacy",
            ),
            models.CheckConstraint(
                condition=Q(actions__contains=["read"]) & Q(actions__contained_by=list(ACTIONS)),
                name="tokens_actions_known_and_read",
            ),
        ]

    def __str__(self) -> str:  # never the digest
        return f"{self.name} ({self.token_key}…) of {self.user}"

    def expired(self, now=None) -> bool:
        return self.expiry is not None and self.expiry <= (now or timezone.now())

    def live(self, now=None) -> bool:
        return self.revoked_at is None and not self.expired(now)

    def pipeline_ids(self) -> frozenset[int]:
        """The pipelines it is limited to; empty: not limited. Read once per instance, and a
        token is read anew for every request."""
        if not hasattr(self, "_pipeline_ids"):
            self._pipeline_ids = frozenset(self.pipelines.values_list("pk", flat=True))
        return self._pipeline_ids

    def pipeline_ids_are(self, ids) -> None:
        """pipeline_ids() as read with the token (tokens.authentication)."""
        self._pipeline_ids = frozenset(ids)

    def allows(self, action: str, pipeline_id: int | None = None) -> bool:
        """The one scope check: whether this token may do `action` (one of ACTIONS) on the
        pipeline `pipeline_id`, or on none in particular. It says nothing of the owner's
        own rights, which the caller checks as well."""
        if action not in ACTIONS:
            raise ValueError(f"unknown token action {action!r}; one of {', '.join(ACTIONS)}")
        if not self.live() or action not in self.actions:
            return False
        limited = self.pipeline_ids()
        if not limited:
            return True
        if pipeline_id is None:
            return action not in PIPELINE_ACTIONS
        return pipeline_id in limited

    def mark_used(self, now=None) -> None:
        """Record a use, at most once per USED_EVERY: one conditional UPDATE, so concurrent
        requests with the same token write it once and most requests write nothing."""
        now = now or timezone.now()
        if self.last_used_at is not None and now - self.last_used_at < USED_EVERY:
            return
        stale = Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - USED_EVERY)
        if ApiToken.objects.filter(stale, pk=self.pk).update(last_used_at=now):
            self.last_used_at = now
