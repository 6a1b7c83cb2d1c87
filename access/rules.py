"""May this user do this to this pipeline? The one answer for every door: the API, the admin,
the log streams, artifacts, and cictl (through the API).

A user may do an action to a pipeline when the token they came with, if any, allows it, and

- they are a superuser, or hold the action's model permissions: those are given by staff,
  and hold on every pipeline (how staff and service accounts are made), or
- they have at least the action's role in one of the teams the pipeline belongs to.

The rules are django-rules predicates (no table: a role is a fact about a membership, so
nothing has to be kept in step per pipeline, as per-object grants would). The same membership
test is also a queryset filter, for lists: `pipelines_for`.
"""

from dataclasses import dataclass

import rules
from django.contrib.postgres.expressions import ArraySubquery
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, Q, QuerySet
from django.http import Http404

from access.models import Membership, Role, Team
from builds.models import Pipeline


@dataclass(frozen=True)
class Action:
    name: str
    scope: str  # what a token must allow: "read" (safe methods) or the action's own
    role: Role  # the least team role that may
    perms: tuple[str, ...]  # the model permissions that allow it on every pipeline


VIEW_PIPELINE = Action("view_pipeline", "read", Role.VIEWER, ("builds.view_pipeline",))
VIEW_BUILDS = Action("view_builds", "read", Role.VIEWER, ("builds.view_build",))  # logs too
TRIGGER = Action("trigger", "trigger", Role.DEVELOPER, ("builds.add_build",))
CANCEL = Action("cancel", "cancel", Role.DEVELOPER, ("builds.cancel_build",))
RETRY = Action("retry", "retry", Role.DEVELOPER, ("builds.retry_build",))  # steps too
EDIT = Action("edit", "edit", Role.MAINTAINER, ("builds.change_pipeline",))
VIEW_SECRETS = Action(
    "view_secrets", "read", Role.MAINTAINER, ("builds.view_pipeline", "vault.view_secret")
)
SET_SECRET = Action(
    "set_secret",
    "edit",
    Role.MAINTAINER,
    ("builds.view_pipeline", "vault.add_secret", "vault.change_secret"),
)
DELETE_SECRET = Action(
    "delete_secret", "edit", Role.MAINTAINER, ("builds.view_pipeline", "vault.delete_secret")
)
VIEW_REPOSITORY = Action("view_repository", "read", Role.MAINTAINER, ("builds.view_pipeline",))
EDIT_REPOSITORY = Action(
    "edit_repository", "edit", Role.MAINTAINER, ("builds.view_pipeline", "builds.change_pipeline")
)
ACTIONS = [
    VIEW_PIPELINE,
    VIEW_BUILDS,
    TRIGGER,
    CANCEL,
    RETRY,
    EDIT,
    VIEW_SECRETS,
    SET_SECRET,
    DELETE_SECRET,
    VIEW_REPOSITORY,
    EDIT_REPOSITORY,
]
SEE = (VIEW_PIPELINE, VIEW_BUILDS)  # who may neither is told the pipeline does not exist


def member(user, role: Role) -> Q:
    """Pipelines of a team where `user` has at least `role` (a filter on Pipeline)."""
    return Q(teams__memberships__user=user, teams__memberships__role__gte=role)


def token_of(user):
    """The API token the request came with (set on the user by tokens' authentication)."""
    return getattr(user, "api_token", None)


def _token_allows(action: Action):
    @rules.predicate(name=f"token allows {action.scope}")
    def allows(user, pipeline) -> bool:
        token = token_of(user)
        return token is None or token.allows(action.scope, pipeline.pk)

    return allows


def _everywhere(action: Action):
    @rules.predicate(name=f"may {action.name} everywhere")
    def holds(user) -> bool:
        return everywhere(user, action)

    return holds


def _has_role(action: Action):
    @rules.predicate(name=f"is {action.role.label} in a team of the pipeline")
    def has_role(user, pipeline) -> bool:
        # Known without a query when the user came with their memberships (a token's, see
        # tokens.authentication) and the pipeline with its teams (with_team_ids).
        roles, teams = getattr(user, "team_roles", None), getattr(pipeline, "team_ids", None)
        if roles is not None and teams is not None:
            return any(roles.get(team, 0) >= action.role for team in teams)
        return Pipeline.objects.filter(member(user, action.role), pk=pipeline.pk).exists()

    return has_role


RULES = rules.RuleSet()
for _action in ACTIONS:
    RULES.add_rule(
        _action.name,
        # A team's role before the model permissions: a member (the usual caller) is
        # answered by one query, where the permissions are two (the user's, the groups').
        rules.is_active
        & _token_allows(_action)
        & (rules.is_superuser | _has_role(_action) | _everywhere(_action)),
    )


def may(user, action: Action, pipeline: Pipeline) -> bool:
    return bool(user and user.is_authenticated) and RULES.test_rule(action.name, user, pipeline)


def require(user, action: Action, pipeline: Pipeline) -> None:
    """Raise unless `user` may: PermissionDenied (403) to who may see the pipeline, Http404 to
    who may not, so that nobody learns what exists beyond what they may see."""
    if may(user, action, pipeline):
        return
    if any(may(user, seen, pipeline) for seen in SEE if seen is not action):
        raise PermissionDenied(f"you may not {action.name.replace('_', ' ')} here")
    raise Http404("no such pipeline")


def everywhere(user, action: Action) -> bool:
    """Whether `user` may do `action` to every pipeline (their token aside): staff's case."""
    return user.is_superuser or user.has_perms(action.perms)


def with_team_ids(pipelines: QuerySet[Pipeline]) -> QuerySet[Pipeline]:
    """Each pipeline read with the ids of its teams, so that `may` asks no more."""
    teams = Team.pipelines.through.objects.filter(pipeline_id=OuterRef("pk")).values("team_id")
    return pipelines.annotate(team_ids=ArraySubquery(teams))


def pipeline_for(user, action: Action, pipeline_id) -> Pipeline:
    """The pipeline of that id, if `user` may do `action` to it (else as `require` says)."""
    pipeline = with_team_ids(Pipeline.objects.filter(pk=pipeline_id)).first()
    if pipeline is None:
        raise Http404("no such pipeline")
    require(user, action, pipeline)
    return pipeline


def pipelines_for(user, action: Action) -> QuerySet[Pipeline]:
    """The pipelines `user` may do `action` to: the list doors' filter, `may` as a query."""
    pipelines = Pipeline.objects.all()
    if not (user and user.is_authenticated and user.is_active):
        return pipelines.none()
    token = token_of(user)
    if token is not None and not token.allows(action.scope):
        return pipelines.none()
    if not everywhere(user, action):
        # As a subquery: a pipeline in several of the user's teams is listed once.
        pipelines = pipelines.filter(pk__in=Pipeline.objects.filter(member(user, action.role)))
    if token is not None and (limited := token.pipeline_ids()):
        pipelines = pipelines.filter(pk__in=limited)
    return pipelines


def has_role_in_a_team(user, role: Role = Role.VIEWER) -> bool:
    """Whether `user` has at least `role` in some team: then the doors that list or create
    pipelines open to them, and each pipeline is then theirs to see or not."""
    if not (user and user.is_authenticated):
        return False
    return Membership.objects.filter(user=user, role__gte=role).exists()


def may_somewhere(user, action: Action) -> bool:
    """Whether `user` may do `action` to some pipeline: then a door offers it (each pipeline
    is asked again when it acts)."""
    return everywhere(user, action) or has_role_in_a_team(user, action.role)


def may_create_pipelines(user) -> bool:
    """Staff with add_pipeline, or a team's maintainer (for their team)."""
    return user.has_perm("builds.add_pipeline") or has_role_in_a_team(user, Role.MAINTAINER)


def may_use_policy(user, policy) -> bool:
    """Policies are staff's: who may change policies may attach any; a team's maintainers
    may attach the ones opened to their team."""
    return (
        user.is_superuser
        or user.has_perm("concurrency.change_concurrencypolicy")
        or policy.teams.filter(
            memberships__user=user, memberships__role__gte=Role.MAINTAINER
        ).exists()
    )
