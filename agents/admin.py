"""Admin for the agent registry: agents register themselves, so everything is read-only
except `status`, which an operator sets to disabled to drain an agent (the form's field, the
list's Drain and Undrain actions, or the change page's buttons: all through
agents.services.set_status). Each agent shows its heartbeat's age by the database's clock,
as the lost-agent sweep judges it, and the jobs it runs, linked to their builds."""

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, F
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from agents import services
from agents.models import Agent, AgentStatus
from builds.models import JobRun
from builds.statuses import RunStatus


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "hostname", "labels_display", "capacity", "status"]
    list_display += ["last_heartbeat", "heartbeat_age", "current_jobs", "leased_to"]
    list_display += ["containment_mode", "suspect_since"]
    list_filter = ["status"]
    list_select_related = ["lease"]
    search_fields = ["name", "hostname"]
    fields = ["name", "hostname", "labels_display", "capacity", "status", "version"]
    fields += ["started_at", "last_heartbeat", "heartbeat_age", "current_jobs", "leased_to"]
    fields += ["containment", "suspect_since", "suspect_reason"]
    readonly_fields = [f for f in fields if f != "status"]
    actions = ["drain_agents", "undrain_agents"]

    def has_add_permission(self, request):
        return False  # an agent exists once `manage.py runagent` registers it

    @admin.display(description="containment")
    def containment_mode(self, obj):
        """The mode alone ("cgroup v2"); its details and limits are on the agent's page."""
        return obj.containment.split(" (", 1)[0]

    def get_queryset(self, request):
        # The heartbeat's age by the database's clock, which stamped it and by which the
        # lost-agent sweep judges it (agents.services): not this web process's clock.
        now = services.DatabaseNow(output_field=DateTimeField())
        age = ExpressionWrapper(now - F("last_heartbeat"), output_field=DurationField())
        return super().get_queryset(request).annotate(heartbeat_delay=age)

    @admin.display(description="labels")
    def labels_display(self, obj):
        return ", ".join(obj.labels)

    @admin.display(description="leased to build")
    def leased_to(self, obj):
        lease = getattr(obj, "lease", None)
        if lease is None:
            return None
        url = reverse(f"{self.admin_site.name}:builds_build_change", args=(lease.build_id,))
        return format_html('<a href="{}">{}</a>', url, lease.build_id)

    @admin.display(description="heartbeat", ordering="-last_heartbeat")
    def heartbeat_age(self, obj):
        """Seconds since its last heartbeat, shown as "42 s ago" (the words are the pages'
        style, admin/agents/agent/style.html, so the cell's text is the number), in red once
        it is lost: offline, or silent for longer than AGENT_OFFLINE_AFTER_SECONDS."""
        if obj.last_heartbeat is None:
            return None
        age = getattr(obj, "heartbeat_delay", None)
        if age is None:  # not read through get_queryset
            age = timezone.now() - obj.last_heartbeat
        seconds = max(0, int(age.total_seconds()))
        limit = settings.AGENT_OFFLINE_AFTER_SECONDS
        lost = obj.status == AgentStatus.OFFLINE or seconds > limit
        title = f"last heartbeat {seconds} s ago" + (
            f"; lost (offline after {limit} s without one)" if lost else ""
        )
        return format_html(
            '<span class="agent-heartbeat{}" title="{}">{}</span>',
            " agent-lost" if lost else "",
            title,
            seconds,
        )

    @admin.display(description="current jobs")
    def current_jobs(self, obj):
        """The jobs it runs (as GET /api/agents/ lists them), each linked to its build."""
        running = JobRun.objects.filter(agent=obj.name, status=RunStatus.RUNNING)
        running = running.select_related("build__pipeline").order_by("id")
        if not running:
            return None
        return format_html_join(
            mark_safe("<br>"),
            '<a href="{}">{}</a> / {} (attempt {})',
            (
                (
                    reverse(f"{self.admin_site.name}:builds_build_change", args=(job.build_id,)),
                    job.build,
                    job.key,
                    job.attempt,
                )
                for job in running
            ),
        )

    def save_model(self, request, obj, form, change):
        # Only `status`: a full save would overwrite the heartbeat the agent wrote meanwhile.
        services.set_status(obj, obj.status)

    # Draining --------------------------------------------------------------------------

    def _drain(self, request, agent: Agent, drain: bool) -> None:
        """Drain (disable) or undrain (back online) `agent` through the service; says what it
        did, or why it did nothing. An agent undrained while it is lost goes offline at the
        next sweep, as its heartbeat says."""
        if drain == (agent.status == AgentStatus.DISABLED):
            state = "already drained" if drain else "not drained"
            self.message_user(request, f"Agent {agent}: {state}", messages.WARNING)
            return
        services.set_status(agent, AgentStatus.DISABLED if drain else AgentStatus.ONLINE)
        done = (
            "drained: it finishes its jobs and takes no new one"
            if drain
            else "undrained: it takes jobs again"
        )
        self.message_user(request, f"Agent {agent}: {done}", messages.SUCCESS)

    @admin.action(description="Drain selected agents", permissions=["change"])
    def drain_agents(self, request, queryset):
        for agent in queryset:
            self._drain(request, agent, True)

    @admin.action(description="Undrain selected agents", permissions=["change"])
    def undrain_agents(self, request, queryset):
        for agent in queryset:
            self._drain(request, agent, False)

    def drain_view(self, request, agent_id, drain: bool):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        # Checked before the lookup, so a 404 tells nothing to who may not change agents.
        if not self.has_change_permission(request):
            raise PermissionDenied
        self._drain(request, get_object_or_404(Agent, pk=agent_id), drain)
        return redirect(reverse(f"{self.admin_site.name}:agents_agent_change", args=(agent_id,)))

    def get_urls(self):
        # Before the defaults: their "<path:object_id>/" would swallow these URLs.
        return [
            path(
                "<int:agent_id>/drain/",
                self.admin_site.admin_view(self.drain_view),
                {"drain": True},
                name="agents_agent_drain",
            ),
            path(
                "<int:agent_id>/undrain/",
                self.admin_site.admin_view(self.drain_view),
                {"drain": False},
                name="agents_agent_undrain",
            ),
            *super().get_urls(),
        ]

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and self.has_change_permission(request, obj):
            drained = obj.status == AgentStatus.DISABLED
            name = "agents_agent_undrain" if drained else "agents_agent_drain"
            context["drain"] = {
                "url": reverse(f"{self.admin_site.name}:{name}", args=(obj.pk,)),
                "label": "Undrain" if drained else "Drain",
            }
        return super().render_change_form(request, context, add, change, form_url, obj)
