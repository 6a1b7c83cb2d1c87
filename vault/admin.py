"""Secrets in the admin: set or replace a value (a password field that never shows one),
see who set which secret when, and the trail; scopes and the pipelines they are open to."""

from django import forms
from django.contrib import admin

from access import rules as access
from access.admin_mixins import PipelineSettings
from audit.admin_mixins import AuditedAdmin
from ciproject.admin_mixins import ReadOnlyAdmin
from vault import services
from vault.errors import InvalidSecret
from vault.models import Secret, SecretEvent, SecretScope


class SecretForm(forms.ModelForm):
    value = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        strip=False,
        required=False,
        help_text="Write-only: never shown again. On a change, leave it empty to keep the value.",
    )

    class Meta:
        model = Secret
        fields = ["pipeline", "scope", "name"]

    def clean(self):
        data = super().clean()
        adding = self.instance.pk is None
        if adding and bool(data.get("pipeline")) == bool(data.get("scope")):
            raise forms.ValidationError(
                "A secret belongs to a pipeline or to a scope: one of them."
            )
        try:
            if adding:
                services.check_name(data.get("name", ""))
            if adding or data.get("value"):
                services.check_value(self.instance.name or data.get("name", ""), data["value"])
        except InvalidSecret as exc:
            raise forms.ValidationError(f"{exc.code}: {exc.detail}") from None
        return data


@admin.register(Secret)
class SecretAdmin(PipelineSettings, admin.ModelAdmin):
    """A team's maintainers set and delete their pipelines' secrets; a shared scope's are
    staff's (the model permissions)."""

    form = SecretForm
    view_actions = (access.VIEW_SECRETS,)
    change_action = access.SET_SECRET
    delete_action = access.DELETE_SECRET
    list_display = ["name", "owner", "updated_by", "updated_at"]
    list_filter = ["scope"]
    search_fields = ["name", "pipeline__name", "scope__name"]
    list_select_related = ["pipeline", "scope", "updated_by"]
    autocomplete_fields = ["pipeline"]

    def get_readonly_fields(self, request, obj=None):
        return ["pipeline", "scope", "name", "updated_by", "updated_at"] if obj else []

    def get_list_filter(self, request):
        return self.list_filter if self._django("view", request) else []  # scopes are staff's

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "scope" and not self._django("change", request):
            kwargs["queryset"] = SecretScope.objects.none()
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request, obj, form, change):
        value = form.cleaned_data.get("value")
        if value:  # a change without one keeps the value it had
            owner = obj.pipeline or obj.scope
            services.set_secret(owner, obj.name, value, request.user, "admin")
        saved = Secret.objects.get(pipeline=obj.pipeline, scope=obj.scope, name=obj.name)
        obj.pk = saved.pk

    def delete_model(self, request, obj):
        services.delete_secret(obj.pipeline or obj.scope, obj.name, request.user, "admin")

    def delete_queryset(self, request, queryset):
        for secret in queryset.select_related("pipeline", "scope"):
            self.delete_model(request, secret)


@admin.register(SecretScope)
class SecretScopeAdmin(AuditedAdmin, admin.ModelAdmin):
    audit_kind = "scope"  # which pipelines may use its secrets, above all
    list_display = ["name", "description"]
    search_fields = ["name"]
    filter_horizontal = ["pipelines"]


@admin.register(SecretEvent)
class SecretEventAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    """Read only: the trail is written by the services."""

    list_display = ["at", "action", "name", "owner", "user", "source", "build"]
    list_filter = ["action", "source"]
    search_fields = ["name", "owner"]
    date_hierarchy = "at"
    list_select_related = ["user", "build"]
