"""Admin for the agent registry: agents register themselves, so everything is read-only
except `status`, which an operator sets to disabled to drain an agent."""

from django.contrib import admin
from django.utils import timezone

from agents import services
from agents.models import Agent


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "hostname", "labels_display", "capacity", "status"]
    list_display += ["last_heartbeat", "heartbeat_age", "leased_to", "suspect_since"]
    list_filter = ["status"]
    list_select_related = ["lease"]
    search_fields = ["name", "hostname"]
    fields = ["name", "hostname", "labels_display", "capacity", "status", "version"]
    fields += ["started_at", "last_heartbeat", "heartbeat_age"]
    readonly_fields = [f for f in fields if f != "status"]

    def has_add_permission(self, request):
        return False  # an agent exists once `manage.py runagent` registers it

    @admin.display(description="labels")
    def labels_display(self, obj):
        return ", ".join(obj.labels)

    @admin.display(description="leased to build")
    def leased_to(self, obj):
        lease = getattr(obj, "lease", None)
        return lease.build_id if lease else None

    @admin.display(description="heartbeat age (s)", ordering="-last_heartbeat")
    def heartbeat_age(self, obj):
        if obj.last_heartbeat is None:
            return None
        return int((timezone.now() - obj.last_heartbeat).total_seconds())

    def save_model(self, request, obj, form, change):
        # Only `status`: a full save would overwrite the heartbeat the agent wrote meanwhile.
        services.set_status(obj, obj.status)
