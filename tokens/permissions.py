"""What an API token's scope lets a request do, route by route, before a view looks anything
up (access.rules.may asks the token again for the one pipeline it decides on). A view's
`needs` is the one table: {its action (an APIView's: the method): the access.rules Action
it needs}, whose `scope` is the token action; for what is no pipeline's (one's own tokens),
the token action itself. Safe methods need "read"; an unsafe action a view does not list
needs "staff": what is new is refused to scoped tokens until someone maps it
(tests/tokens/test_scope.py checks every route is). ApiToken.allows is the only check.

TokenScope is in DEFAULT_PERMISSION_CLASSES, and ciproject.permissions.requires (the
permission of every view that names its own) includes it. A token limited to pipelines
meets another pipeline's object as a 404 where it reads, a 403 where it acts; its lists
leave the other pipelines out (TokenPipelines, a filter backend)."""

from rest_framework import permissions
from rest_framework.exceptions import NotFound
from rest_framework.filters import BaseFilterBackend

from builds.models import Build, Pipeline
from tokens.errors import TokenScope as TokenScopeRefused
from tokens.models import ApiToken

STAFF = "staff"

# view: (URL keyword, what it names) for views whose object is a pipeline's but whose URL
# does not say `pipeline_id`, which names a pipeline in every other view.
PIPELINE_IN_URL = {
    "builds.api.PipelineViewSet": ("pk", Pipeline),
    "builds.api.BuildViewSet": ("pk", Build),
    "artifacts.api.BuildArtifactViewSet": ("build_id", Build),
}
# model: its pipeline, for the lists TokenPipelines narrows
PIPELINE_OF = {Pipeline: "pk", Build: "pipeline_id"}


def _name(view) -> str:
    return f"{type(view).__module__}.{type(view).__qualname__}"


def scope_needed(view, action: str) -> str:
    """The token action an unsafe `action` of `view` (a view or its class) needs."""
    needed = getattr(view, "needs", {}).get(action)
    return getattr(needed, "scope", needed) or STAFF


def token_action(request, view) -> str:
    if request.method in permissions.SAFE_METHODS:
        return "read"
    return scope_needed(view, getattr(view, "action", None) or request.method.lower())


def pipeline_of(view) -> int | None:
    """The pipeline the request's URL names, if any (None also when it names nothing that
    exists: the view answers that 404 itself)."""
    keyword, model = PIPELINE_IN_URL.get(_name(view), ("pipeline_id", Pipeline))
    value = view.kwargs.get(keyword)
    if value is None or not str(value).isdecimal():
        return None
    if model is Pipeline:
        return int(value)
    return Build.objects.filter(pk=int(value)).values_list("pipeline_id", flat=True).first()


def request_token(request) -> ApiToken | None:
    return request.auth if isinstance(request.auth, ApiToken) else None


class TokenScope(permissions.BasePermission):
    """Allows what a session may; of a token, what its scope allows."""

    def has_permission(self, request, view):
        token = request_token(request)
        if token is None:
            return True
        action = token_action(request, view)
        # Which pipeline the URL names matters only to a token limited to some.
        pipeline = pipeline_of(view) if token.pipeline_ids() else None
        if token.allows(action, pipeline):
            return True
        if pipeline is not None and token.allows(action):  # outside its pipelines
            if action == "read":
                raise NotFound()
            raise TokenScopeRefused(f"this API token is not for pipeline {pipeline}")
        if action in token.actions:  # a limited token, and no pipeline of its own named
            raise TokenScopeRefused(f"this API token may {action} only on its pipelines")
        raise TokenScopeRefused(
            f"this API token may not {action}: its actions are {', '.join(token.actions)}"
        )


class TokenPipelines(BaseFilterBackend):
    """A pipeline-limited token's lists (and objects) are of its pipelines only."""

    def filter_queryset(self, request, queryset, view):
        token = request_token(request)
        field = PIPELINE_OF.get(queryset.model)
        if token is None or field is None or not token.pipeline_ids():
            return queryset
        return queryset.filter(**{f"{field}__in": token.pipeline_ids()})
