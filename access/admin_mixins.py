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
        return self._by_role(request, obj, self._actions())

    def has_change_permission(self, request, obj=None):
        return self.change_action is not None and self._by_role(request, obj, [self.change_action])

    def _by_role(self, request, obj, actions) -> bool:
        """Whether the user may do one of `actions` to `obj`'s pipeline (to some pipeline,
        for the page itself); an object of no pipeline is no team's."""
        if obj is None:
            return any(self.may_somewhere(request, action) for action in actions)
        pipeline = self.pipeline_of(obj)
        return pipeline is not None and any(
            access.may(request.user, action, pipeline) for action in actions
        )

    def may(self, request, action, obj) -> bool:
        return access.may(request.user, action, self.pipeline_of(obj))

    def may_somewhere(self, request, action) -> bool:
        """Whether the page may offer `action` (each object is asked again when it acts)."""
        return access.may_somewhere(request.user, action)


class PipelineSettings(PipelineScoped):
    """A pipeline's settings (its secrets, repository, schedules): a team's maintainers manage
    them for the pipelines of their teams, by the API's rule (access.rules); Django's model
    permissions still reach every object, those of no pipeline too (a shared scope's
    secrets). Mix in before admin.ModelAdmin."""

    delete_action = None  # None: change_action

    def _django(self, what: str, request, obj=None) -> bool:
        """Django's own answer: the model permission, on every object."""
        django = super(PipelineScoped, self)
        if what == "add":
            return django.has_add_permission(request)
        return getattr(django, f"has_{what}_permission")(request, obj)

    def has_view_permission(self, request, obj=None):
        return self._django("view", request, obj) or self._by_role(request, obj, self._actions())

    def has_change_permission(self, request, obj=None):
        return self._django("change", request, obj) or self._by_role(
            request, obj, [self.change_action]
        )

    def has_delete_permission(self, request, obj=None):
        return self._django("delete", request, obj) or self._by_role(
            request, obj, [self.delete_action or self.change_action]
        )

    def has_add_permission(self, request):
        return self._django("add", request) or self.may_somewhere(request, self.change_action)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        # A form offers the pipelines one may set this on (and validates against them).
        everywhere = self._django("add", request) or self._django("change", request)
        if db_field.name == "pipeline" and not everywhere:
            kwargs["queryset"] = access.pipelines_for(request.user, self.change_action)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)
