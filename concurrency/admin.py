"""Admin for concurrency policies: their limits (validated by the model's validators and its
`clean()`, so the admin, the API and the shell agree), live counts, and per group of a policy
the running builds and the queue, where an operator may cancel a queued build. And the page
of one group (whoever may see the policies): its running builds with their expected ends,
its queue in order with each build's position and estimated start (queue_positions)."""

from datetime import timedelta

from django import forms
from django.contrib import admin
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db.models import Count, FilteredRelation, IntegerField, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.urls import path, reverse
from django.utils import timezone

from audit.admin_mixins import AuditedAdmin
from builds.admin.cancelling import CancelsBuilds
from builds.models import Build
from builds.statuses import BUILD_LIVE, BuildStatus
from ciproject.admin_mixins import ReadOnlyAdmin
from ciproject.formatting import human_duration
from concurrency.models import ConcurrencyGroup, ConcurrencyPolicy
from concurrency.services import LIVE_RUNNING, group_overview, group_queue, occupying


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
class ConcurrencyPolicyAdmin(AuditedAdmin, CancelsBuilds, admin.ModelAdmin):
    form = ConcurrencyPolicyForm
    audit_kind = "policy"  # policies are edited here only
    list_display = ["name", "group_key", "max_running", "queue_length", "queue_timeout"]
    list_display += ["on_queue_full", "cancel_in_progress", "running_count", "queued_count"]
    list_filter = ["on_queue_full", "cancel_in_progress"]
    search_fields = ["name", "group_key"]

    def get_queryset(self, request):
        # The join only takes live builds (the condition is in its ON clause), so a policy's
        # finished history is never scanned for the counts.
        live = FilteredRelation("build", condition=Q(build__status__in=BUILD_LIVE))
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

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["policy_groups"] = self._groups(request, obj)
            context["queue_timeout"] = human_duration_seconds(obj.queue_timeout)
        return super().render_change_form(request, context, add, change, form_url, obj)

    # The overview is shown after the change form (see the template), so its Cancel forms
    # are never nested in it.
    def _groups(self, request, policy) -> list[dict]:
        """Each group of the policy's live builds: its key, its running builds as (build, its
        page), its queue in order as (build, its page, how long it has waited, the URL its
        Cancel form posts to, empty without the permission)."""
        can_cancel = self.has_cancel_permission(request)
        return [
            {
                "key": group["key"],
                "running": [(build, self._build_url(build)) for build in group["running"]],
                "queued": [
                    (
                        build,
                        self._build_url(build),
                        human_duration(waited),
                        self._cancel_url(policy, build) if can_cancel else "",
                    )
                    for build, waited in group["queued"]
                ],
            }
            for group in group_overview(policy)
        ]

    def _build_url(self, build):
        return reverse(f"{self.admin_site.name}:builds_build_change", args=(build.pk,))

    def _cancel_url(self, policy, build):
        return reverse(
            f"{self.admin_site.name}:concurrency_concurrencypolicy_cancel_build",
            args=(policy.pk, build.pk),
        )

    def cancel_build_view(self, request, policy_id, build_id):
        of_policy = Build.objects.select_related("pipeline").filter(policy_id=policy_id)
        next_url = reverse(
            f"{self.admin_site.name}:concurrency_concurrencypolicy_change", args=(policy_id,)
        )
        return self.cancel_build_response(request, of_policy, build_id, next_url)

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


def _members(condition: Q):
    """How many builds of the group (a ConcurrencyGroup row) match `condition`."""
    of_group = Build.objects.filter(condition, concurrency_group=OuterRef("key")).order_by()
    counted = of_group.values("concurrency_group").annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), 0)


@admin.register(ConcurrencyGroup)
class ConcurrencyGroupAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    """Read only: a group is a rendered key, made by the first admission into it. Its page
    lists its running builds and its queue in queue order."""

    change_form_template = "admin/concurrency/concurrencygroup/change_form.html"
    list_display = ["key", "running_count", "queued_count", "created_at"]
    search_fields = ["key"]
    ordering = ["key"]
    fields = ["key", "created_at"]
    readonly_fields = ["key", "created_at"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(running=_members(occupying()), queued=_members(Q(status=BuildStatus.QUEUED)))
        )

    @admin.display(description="running", ordering="running")
    def running_count(self, obj):
        return obj.running

    @admin.display(description="queued", ordering="queued")
    def queued_count(self, obj):
        return obj.queued

    # Whoever may see the policies may see their groups.
    def has_view_permission(self, request, obj=None):
        return super().has_view_permission(request, obj) or any(
            request.user.has_perm(f"concurrency.{action}_concurrencypolicy")
            for action in ("view", "change")
        )

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["group_queue"] = self._queue(obj)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _queue(self, group) -> dict:
        """The group's running builds as (build, its page, started, expected end), its queue
        as (position, build, its page, waited, estimated start), each time with how far from
        now it is; the limit counted (the head's policy) and that policy's page."""
        now = timezone.now()
        queue = group_queue(group.key, now)
        head_policy = queue.queued[0].build.policy if queue.queued else None
        return {
            "limit": queue.limit,
            "policy": head_policy,
            "policy_url": self._policy_url(head_policy) if head_policy else "",
            "running": [
                (r.build, self._build_url(r.build), r.build.started_at, _when(r.expected_end, now))
                for r in queue.running
            ],
            "queued": [
                (
                    w.place.position,
                    w.build,
                    self._build_url(w.build),
                    human_duration(now - w.build.enqueued_at) if w.build.enqueued_at else "",
                    _when(w.place.estimated_start, now),
                )
                for w in queue.queued
            ],
        }

    def _build_url(self, build):
        return reverse(f"{self.admin_site.name}:builds_build_change", args=(build.pk,))

    def _policy_url(self, policy):
        return reverse(
            f"{self.admin_site.name}:concurrency_concurrencypolicy_change", args=(policy.pk,)
        )


def _when(moment, now) -> tuple | None:
    """(moment, "in 3m 05s" or "now"), None when unknown."""
    if moment is None:
        return None
    ahead = moment - now
    return (moment, f"in {human_duration(ahead)}" if ahead >= timedelta(seconds=1) else "now")
