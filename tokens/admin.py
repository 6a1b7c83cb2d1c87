"""API tokens in the admin: the list (prefix, name, owner, kind, expiry, last use, scope),
a form that makes one and shows its value on the answer page (once: not in a message, which
would sit in a cookie), and a revoke action. Every staff member sees and manages their own
tokens; with tokens.view_apitoken, everyone's, and with tokens.add_apitoken makes tokens for
others (service accounts)."""

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.utils import timezone

from builds.models import Pipeline
from ciproject.errors import CIError
from tokens import services
from tokens.models import ACTIONS, ApiToken, Kind


class TokenForm(forms.Form):
    owner = forms.ModelChoiceField(get_user_model().objects.none())
    name = forms.CharField(max_length=100)
    kind = forms.ChoiceField(choices=Kind.choices, initial=Kind.PERSONAL)
    days = forms.IntegerField(min_value=1, required=False, help_text="empty: the default")
    actions = forms.MultipleChoiceField(
        choices=[(a, a) for a in ACTIONS],
        initial=["read"],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="read is always included; staff: server-wide changes",
    )
    pipelines = forms.ModelMultipleChoiceField(
        Pipeline.objects.order_by("name"),
        required=False,
        help_text="none: every pipeline the owner may reach",
    )

    def __init__(self, *args, owners, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["owner"].queryset = owners


class TokenState(admin.SimpleListFilter):
    title = parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("live", "live"), ("expired", "expired"), ("revoked", "revoked")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expiry__lte=now)
        if self.value() == "live":
            live = queryset.filter(revoked_at__isnull=True)
            return live.exclude(expiry__lte=now)
        return queryset


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["token_key", "name", "user", "kind", "expiry", "last_used_at", "scope"]
    list_display += ["state"]
    list_filter = [TokenState, "kind", "legacy", "expiry", "last_used_at"]
    search_fields = ["name", "token_key", "user__username"]
    list_select_related = ["user"]
    fields = ["token_key", "name", "user", "kind", "actions", "pipelines", "created", "expiry"]
    fields += ["last_used_at", "revoked_at", "revoked_by", "legacy"]
    readonly_fields = fields  # a token changes through its service: made, rotated, revoked
    actions = ["revoke"]

    def _sees_all(self, request) -> bool:
        return request.user.has_perm("tokens.view_apitoken")

    def get_queryset(self, request):
        tokens = super().get_queryset(request).prefetch_related("pipelines")
        return tokens if self._sees_all(request) else tokens.filter(user=request.user)

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request, obj=None):
        return self.has_module_permission(request) and (
            obj is None or self._sees_all(request) or obj.user_id == request.user.pk
        )

    def has_add_permission(self, request):
        return self.has_module_permission(request)

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # revoked, not deleted: the row is the record

    def has_revoke_permission(self, request):
        return self.has_module_permission(request)

    @admin.display(description="scope")
    def scope(self, token):
        pipelines = token.pipelines.all()
        where = ", ".join(p.name for p in pipelines) if pipelines else "every pipeline"
        return f"{', '.join(token.actions)} on {where}"

    @admin.display(description="state")
    def state(self, token):
        if token.revoked_at is not None:
            return "revoked"
        return "expired" if token.expired() else "live"

    @admin.action(description="Revoke selected tokens", permissions=["revoke"])
    def revoke(self, request, queryset):
        revoked = 0
        for token in queryset.filter(revoked_at__isnull=True):
            if not services.may_manage(request.user, token):
                raise PermissionDenied
            services.revoke_token(token, request.user)
            revoked += 1
        self.message_user(request, f"{revoked} token(s) revoked.", messages.SUCCESS)

    def add_view(self, request, form_url="", extra_context=None):
        if not self.has_add_permission(request):
            raise PermissionDenied
        users = get_user_model().objects.order_by("username")
        if not request.user.has_perm("tokens.add_apitoken"):
            users = users.filter(pk=request.user.pk)
        form = TokenForm(request.POST or None, owners=users, initial={"owner": request.user})
        context = {**self.admin_site.each_context(request), "opts": self.opts, "form": form}
        context["title"] = "Add API token"
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                token, value = services.create_token(
                    data["owner"],
                    data["name"],
                    actions=data["actions"],
                    days=data["days"],
                    pipelines=[p.pk for p in data["pipelines"]],
                    kind=data["kind"],
                )
            except CIError as exc:
                form.add_error(None, f"{exc.code}: {exc.detail}")
            else:
                self.log_addition(request, token, [{"added": {}}])
                context.update(token=token, value=value, title="API token made")
                # The admin's views are never_cache: the page is not kept either.
                return TemplateResponse(request, "admin/tokens/apitoken/created.html", context)
        return TemplateResponse(request, "admin/tokens/apitoken/add.html", context)
