from django.contrib import admin

from audit.models import AuditEvent
from ciproject.admin_mixins import ReadOnlyAdmin


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    """Read only, for everyone (superusers too): the trail is written by the services."""

    list_display = ["at", "username", "token_name", "via", "address", "action", "target_label"]
    list_filter = [
        "action",
        ("actor", admin.RelatedOnlyFieldListFilter),
        "token_name",
        "via",
    ]
    search_fields = ["target_label", "username", "address"]
    date_hierarchy = "at"
    list_select_related = ["actor"]
    show_full_result_count = False  # no count(*) of the whole trail for each page
    actions = None

    def has_view_permission(self, request, obj=None):
        # The view permission only: change_auditevent, which nobody needs, gives nothing.
        return request.user.has_perm("audit.view_auditevent")
