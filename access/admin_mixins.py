"""The admin by team: a ModelAdmin of pipelines, or of a pipeline's objects, shows a team
member what their roles reach (access.rules), and model permissions still reach every
pipeline. Staff status is what lets a person into the admin at all (Django's rule)."""

from django.contrib.auth import get_permission_codename

from access import rules as access


class PipelineScoped:
    """Mix in before admin.ModelAdmin (after ReadOnlyAdmin, which stays read-only)."""

    pipeline_field = "pipeline"  # the lookup to the object's pipeline; "" for Pipeline itself
    view_actions = (access.VIEW_BUILDS,)  # any of these shows an object
    change_action = access.EDIT  # None: a read-only page

    def _actions(self) -> tuple:
        return (*self.view_actions, *filter(None, [self.change_action]))

    def pipeline_of(self, obj):
        for name in filter(None, self.pipeline_field.split("__")):
            obj = getattr(obj, name)
        return obj

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        user, actions = request.user, self._actions()
        # A model permission (staff's) reaches every object: delete too.
        opts = self.opts
        codenames = (get_permission_codename(a, opts) for a in ("view", "change", "delete"))
        if any(user.has_perm(f"{opts.app_label}.{c}") for c in codenames) or any(
            access.everywhere(user, action) for action in actions
        ):
            return queryset
        allowed = access.pipelines_for(user, actions[0])
        for action in actions[1:]:
            allowed = allowed | access.pipelines_for(user, action)
        return queryset.filter(**{f"{self.pipeline_field or 'pk'}__in": allowed.values("pk")})

    def has_module_permission(self, request):
        return super().has_module_permission(request) or access.has_role_in_a_team(request.user)

    def has_view_permission(self, request, obj=None):
        if obj is None:
            return any(self.may_somewhere(request, action) for action in self._actions())
        pipeline = self.pipeline_of(obj)
        return any(access.may(request.user, action, pipeline) for action in self._actions())

    def has_change_permission(self, request, obj=None):
        if self.change_action is None:
            return False
        if obj is None:
            return self.may_somewhere(request, self.change_action)
        return access.may(request.user, self.change_action, self.pipeline_of(obj))

    def may(self, request, action, obj) -> bool:
        return access.may(request.user, action, self.pipeline_of(obj))

    def may_somewhere(self, request, action) -> bool:
        """Whether the page may offer `action` (each object is asked again when it acts)."""
        return access.may_somewhere(request.user, action)
