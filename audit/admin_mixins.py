"""For the ModelAdmins whose forms change state with no service between (concurrency
policies, schedules, secret scopes): their saves and deletes recorded as KIND.create, .edit
and .delete. The admin runs a form's save_model and save_related in one transaction."""

from django.core.exceptions import FieldDoesNotExist
from django.db import transaction

from audit.trail import record, record_save, stored


class AuditedAdmin:
    """`audit_kind` names the actions. A ModelAdmin whose save_model calls a service that
    records (pipelines) overrides save_model, and keeps only the deletes from here."""

    audit_kind = ""

    def save_model(self, request, obj, form, change):
        # The row before the form's values are saved (obj holds them already).
        form.audit_before = stored(obj, _fields(form, obj)) if change else None
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)  # many-to-many fields too
        if hasattr(form, "audit_before"):  # (not when save_model was the ModelAdmin's own)
            obj = form.instance
            record_save(self.audit_kind, obj, form.audit_before, _fields(form, obj))

    def delete_model(self, request, obj):
        with transaction.atomic():
            record(f"{self.audit_kind}.delete", obj)
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for obj in queryset:
                record(f"{self.audit_kind}.delete", obj)
            super().delete_queryset(request, queryset)


def _fields(form, obj) -> list[str]:
    """The form's model fields."""
    names = []
    for name in form.fields:
        try:
            obj._meta.get_field(name)
        except FieldDoesNotExist:  # a form's own field
            continue
        names.append(name)
    return names
