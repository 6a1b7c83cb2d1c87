"""The admin's list of the variable table's partitions (read-only)."""

from django.contrib import admin

from builds import partitions
from builds.models import VariablePartition
from ciproject.admin_mixins import ReadOnlyAdmin


@admin.register(VariablePartition)
class VariablePartitionAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    """The partitions of the variable table, as the catalog last showed them (upkeep, beat
    and `manage.py partitions` reconcile this mirror with pg_inherits)."""

    list_display = ["name", "range_start", "range_end", "rows_estimate", "state"]
    list_display += ["dropped_at", "dropped_by"]
    list_filter = ["state"]
    readonly_fields = [f.name for f in VariablePartition._meta.fields]

    def changelist_view(self, request, extra_context=None):
        if self.has_view_or_change_permission(request):  # a write: not for who may not look
            partitions.reconcile()  # show the catalog as it is now, not as it was
        return super().changelist_view(request, extra_context)
