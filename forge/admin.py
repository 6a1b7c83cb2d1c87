"""The admin of a pipeline's source: its repository (the webhook secret shown once, when
made or rotated), run now, its schedules, and the commit statuses owed and delivered."""

import uuid

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from access import rules as access
from access.admin_mixins import PipelineSettings
from audit.admin_mixins import AuditedAdmin
from ciproject.admin_mixins import ReadOnlyAdmin
from ciproject.errors import CIError
from forge import cron
from forge.models import CommitStatus, Repository, Schedule
from forge.services import repositories, runs


class RepositoryForm(forms.ModelForm):
    class Meta:
        model = Repository
        fields = ["pipeline", *repositories.FIELDS]

    def clean(self):
        data = super().clean()
        pipeline = data.get("pipeline") or getattr(self.instance, "pipeline", None)
        if pipeline is not None and not self.errors:
            values = {name: data.get(name) or "" for name in repositories.FIELDS}
            try:  # the rule the API applies
                repositories.validate(pipeline, values)
            except CIError as exc:
                raise forms.ValidationError(exc.detail) from None
        return data


def _show_secret(modeladmin, request, repository: Repository, secret: str) -> None:
    # Shown once, on the next page; never in the admin's history (it records field names).
    modeladmin.message_user(
        request,
        format_html(
            "The webhook secret of {}: <code>{}</code>. Give it to the forge now: it is not"
            " shown again.",
            repository.pipeline,
            secret,
        ),
        messages.WARNING,
    )


@admin.register(Repository)
class RepositoryAdmin(PipelineSettings, admin.ModelAdmin):
    form = RepositoryForm
    view_actions = (access.VIEW_REPOSITORY,)
    change_action = access.EDIT_REPOSITORY
    list_display = ["pipeline", "forge", "clone_url", "default_branch", "webhook_secret_set_at"]
    readonly_fields = ["webhook_urls", "webhook_secret_set_at", "run_now_link"]
    actions = ["rotate_webhook_secret"]

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, "pipeline"] if obj else []

    @admin.display(description="webhook URLs")
    def webhook_urls(self, obj):
        base = f"/api/pipelines/{obj.pipeline_id}/hooks/{obj.forge}/"
        return format_html("<code>{}{}</code>", settings.PUBLIC_URL, base)

    @admin.display(description="run now")
    def run_now_link(self, obj):
        url = reverse(f"{self.admin_site.name}:forge_repository_run", args=(obj.pk,))
        return format_html('<a class="button" href="{}">Run now…</a>', url)

    def save_model(self, request, obj, form, change):
        values = {name: form.cleaned_data.get(name) or "" for name in repositories.FIELDS}
        saved, secret = repositories.set_repository(
            form.cleaned_data.get("pipeline") or obj.pipeline, values
        )
        obj.pk, obj.webhook_secret_set_at = saved.pk, saved.webhook_secret_set_at
        if secret:
            _show_secret(self, request, saved, secret)

    def delete_model(self, request, obj):
        repositories.delete_repository(obj)

    def delete_queryset(self, request, queryset):
        for repository in queryset.select_related("pipeline"):
            repositories.delete_repository(repository)

    @admin.action(
        description="Rotate the webhook secret (the old one stops working)",
        permissions=["change"],
    )
    def rotate_webhook_secret(self, request, queryset):
        chosen = list(queryset.select_related("pipeline"))
        if not all(self.has_change_permission(request, repository) for repository in chosen):
            raise PermissionDenied("you may not rotate the secret of some of these")
        for repository in chosen:
            _show_secret(self, request, repository, repositories.rotate_webhook_secret(repository))

    def run_view(self, request, repository_id):
        """Run now: a branch's head or a commit, through the service the API calls."""
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        repository = get_object_or_404(
            Repository.objects.select_related("pipeline"), pk=repository_id
        )
        access.require(request.user, access.TRIGGER, repository.pipeline)
        form = RunForm(request.POST or None, initial={"idempotency_key": uuid.uuid4().hex})
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                build, _ = runs.run_now(
                    repository.pipeline, data["branch"], data["commit"], user=request.user,
                    idempotency_key=data["idempotency_key"],
                )  # fmt: skip
            except CIError as exc:
                self.message_user(request, f"{exc.code}: {exc.detail}", messages.ERROR)
            else:
                self.message_user(
                    request, f"Build {build} started: {build.status}", messages.SUCCESS
                )
                return redirect(
                    reverse(f"{self.admin_site.name}:builds_build_change", args=(build.pk,))
                )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Run {repository.pipeline} now",
            "repository": repository,
            "form": form,
        }
        return TemplateResponse(request, "admin/forge/repository/run.html", context)

    def get_urls(self):
        return [
            path(
                "<int:repository_id>/run/",
                self.admin_site.admin_view(self.run_view),
                name="forge_repository_run",
            ),
            *super().get_urls(),
        ]


class RunForm(forms.Form):
    branch = forms.CharField(required=False, help_text="Empty: the repository's default branch.")
    commit = forms.CharField(
        required=False,
        help_text="A commit's full sha; empty: the branch's head, asked of the forge.",
    )
    idempotency_key = forms.CharField(widget=forms.HiddenInput)


class ScheduleForm(forms.ModelForm):
    class Meta:
        model = Schedule
        fields = ["pipeline", "cron", "timezone", "branch", "variables", "enabled"]

    def clean(self):
        data = super().clean()
        if why := cron.validate(data.get("cron") or "", data.get("timezone") or ""):
            raise forms.ValidationError(why)
        return data


@admin.register(Schedule)
class ScheduleAdmin(AuditedAdmin, PipelineSettings, admin.ModelAdmin):
    form = ScheduleForm
    view_actions = (access.VIEW_PIPELINE,)  # a schedule is part of its pipeline
    change_action = access.EDIT
    audit_kind = "schedule"  # those of the YAML change with their pipeline's edits
    list_display = ["pipeline", "cron", "timezone", "branch", "enabled", "from_definition"]
    list_display += ["next_tick", "last_tick", "last_build", "last_error"]
    list_filter = ["enabled", "from_definition"]
    readonly_fields = ["from_definition", "last_tick", "last_build", "last_error", "next_tick"]

    @admin.display(description="next tick")
    def next_tick(self, obj):
        if not obj.pk or cron.validate(obj.cron, obj.timezone):
            return "-"
        return cron.next_tick(obj.cron, obj.timezone, timezone.now())

    def has_change_permission(self, request, obj=None):
        # A schedule of the YAML is edited there: the next sweep would put it back.
        if obj is not None and obj.from_definition:
            return False
        return super().has_change_permission(request, obj)

    has_delete_permission = has_change_permission


@admin.register(CommitStatus)
class CommitStatusAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ["build", "last_state", "delivered", "done", "attempts", "last_attempt_at"]
    list_display += ["last_http_status", "last_error"]
    list_filter = ["done", "last_state"]
    search_fields = ["build__pipeline__name"]
