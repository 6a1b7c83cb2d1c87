"""Admin for concurrency policies: their limits (validated by the model's validators and its
`clean()`, so the admin, the API and the shell agree), live counts, and per group of a policy
the running builds and the queue, where an operator may cancel a queued build."""

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db.models import Count, FilteredRelation, Q
from django.http import HttpResponseNotAllowed
from django.middleware.csrf import get_token
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from builds import services as build_services
from builds.models import Build
from builds.statuses import BuildStatus
from ciproject.errors import CIError
from ciproject.formatting import human_duration
from concurrency.models import ConcurrencyPolicy
from concurrency.services import LIVE_RUNNING, group_overview

LIVE = (*LIVE_RUNNING, BuildStatus.QUEUED)


class ConcurrencyPolicyForm(forms.ModelForm):
    """The limits are checked by the model (its validators and `clean()`), whose messages the
    admin shows next to each field. Here they only become the number inputs' min and max."""

    class Meta:
        model = ConcurrencyPolicy
        fields = [
            "name",
            "group_key",
            "max_running",
            "queue_length",
            "queue_timeout",
            "on_queue_full",
            "cancel_in_progress",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, field in self.fields.items():
            validators = self._meta.model._meta.get_field(name).validators
            low = [v.limit_value for v in validators if isinstance(v, MinValueValidator)]
            high = [v.limit_value for v in validators if isinstance(v, MaxValueValidator)]
            if low:
                field.widget.attrs["min"] = max(low)
            if high:
                field.widget.attrs["max"] = min(high)


@admin.register(ConcurrencyPolicy)
class ConcurrencyPolicyAdmin(admin.ModelAdmin):
    form = ConcurrencyPolicyForm
    list_display = ["name", "group_key", "max_running", "queue_length", "queue_timeout"]
    list_display += ["on_queue_full", "cancel_in_progress", "running_count", "queued_count"]
    list_filter = ["on_queue_full", "cancel_in_progress"]
    search_fields = ["name", "group_key"]

    def get_queryset(self, request):
        # The join only takes live builds (the condition is in its ON clause), so a policy's
        # finished history is never scanned for the counts.
        live = FilteredRelation("build", condition=Q(build__status__in=LIVE))
        return (
            super()
            .get_queryset(request)
            .annotate(live_builds=live)
            .annotate(
                running=Count("live_builds", filter=Q(live_builds__status__in=LIVE_RUNNING)),
                queued=Count("live_builds", filter=Q(live_builds__status=BuildStatus.QUEUED)),
            )
        )

    @admin.display(description="running", ordering="running")
    def running_count(self, obj):
        return obj.running

    @admin.display(description="queued", ordering="queued")
    def queued_count(self, obj):
        return obj.queued

    def has_cancel_permission(self, request):
        return request.user.has_perm("builds.cancel_build")

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["groups_overview"] = self._groups_overview(request, obj)
        return super().render_change_form(request, context, add, change, form_url, obj)

    # The overview is shown after the change form (see the template), so its Cancel forms
    # are never nested in it.
    def _groups_overview(self, request, policy):
        groups = group_overview(policy)
        if not groups:
            return format_html("<p>{}</p>", "No build of this policy is running or queued.")
        can_cancel = self.has_cancel_permission(request)
        return format_html_join(
            "",
            "{}",
            ((self._group_html(request, policy, group, can_cancel),) for group in groups),
        )

    def _group_html(self, request, policy, group, can_cancel):
        running = [
            format_html('<li><a href="{}">{}</a> {}</li>', self._build_url(b), b, b.status)
            for b in group["running"]
        ]
        queued = [
            format_html(
                '<tr><td>{}</td><td><a href="{}">{}</a></td><td>{}</td><td>{}</td></tr>',
                position,
                self._build_url(build),
                build,
                human_duration(waited),
                self._cancel_form(request, policy, build) if can_cancel else "",
            )
            for position, (build, waited) in enumerate(group["queued"], start=1)
        ]
        return format_html(
            '<div class="policy-group"><h3>group <code>{}</code></h3>'
            "<p>running {} of at most {}; queued {} of at most {}; a build waits at most {}</p>"
            "<h4>running</h4>{}<h4>queued, in queue order</h4>{}</div>",
            group["key"],
            len(group["running"]),
            policy.max_running,
            len(group["queued"]),
            policy.queue_length,
            human_duration_seconds(policy.queue_timeout),
            format_html("<ul>{}</ul>", format_html_join("", "{}", zip(running)))
            if running
            else format_html("<p>{}</p>", "none"),
            format_html(
                "<table><thead><tr><th>#</th><th>build</th><th>waiting</th><th></th></tr>"
                "</thead><tbody>{}</tbody></table>",
                format_html_join("", "{}", zip(queued)),
            )
            if queued
            else format_html("<p>{}</p>", "none"),
        )

    def _build_url(self, build):
        return reverse(f"{self.admin_site.name}:builds_build_change", args=(build.pk,))

    def _cancel_form(self, request, policy, build):
        url = reverse(
            f"{self.admin_site.name}:concurrency_concurrencypolicy_cancel_build",
            args=(policy.pk, build.pk),
        )
        return format_html(
            '<form method="post" action="{}" style="display: inline">'
            '<input type="hidden" name="csrfmiddlewaretoken" value="{}">'
            '<button type="submit" class="button">Cancel</button></form>',
            url,
            get_token(request),
        )

    def cancel_build_view(self, request, policy_id, build_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        # Checked before the lookup, so a 404 tells nothing to who may not cancel.
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        build = get_object_or_404(
            Build.objects.select_related("pipeline"), pk=build_id, policy_id=policy_id
        )
        try:
            status = build_services.request_cancel(build.pk, request.user)
        except CIError as exc:
            self.message_user(request, f"Build {build}: {exc.code}: {exc.detail}", messages.WARNING)
        else:
            self.message_user(request, f"Build {build}: {status}", messages.SUCCESS)
        return redirect(
            reverse(
                f"{self.admin_site.name}:concurrency_concurrencypolicy_change", args=(policy_id,)
            )
        )

    def get_urls(self):
        # Before the defaults: their "<path:object_id>/" would swallow this URL.
        return [
            path(
                "<int:policy_id>/builds/<int:build_id>/cancel/",
                self.admin_site.admin_view(self.cancel_build_view),
                name="concurrency_concurrencypolicy_cancel_build",
            ),
            *super().get_urls(),
        ]


def human_duration_seconds(seconds: int) -> str:
    return human_duration(timedelta(seconds=seconds))
