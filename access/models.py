"""Teams: who may do what to which pipelines. A pipeline belongs to the teams that list it;
each member has one role in a team, and a role includes the ones below it."""

from django.conf import settings
from django.db import models


class Role(models.IntegerChoices):
    VIEWER = 10, "viewer"  # sees builds and their logs and artifacts
    DEVELOPER = 20, "developer"  # and triggers, cancels and retries them
    MAINTAINER = 30, "maintainer"  # and edits the pipeline, its secrets and its repository


class Team(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    description = models.CharField(max_length=500, blank=True)
    pipelines = models.ManyToManyField("builds.Pipeline", related_name="teams", blank=True)
    # Concurrency policies are staff's; the ones listed here this team's maintainers may
    # also attach to their pipelines.
    policies = models.ManyToManyField(
        "concurrency.ConcurrencyPolicy", related_name="teams", blank=True
    )
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="Membership", related_name="teams"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.PositiveSmallIntegerField(choices=Role.choices, default=Role.VIEWER)

    class Meta:
        constraints = [models.UniqueConstraint("team", "user", name="one_role_per_team")]
        indexes = [models.Index("user", "role", name="membership_user_role")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.get_role_display()})"
