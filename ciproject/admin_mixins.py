"""What the admin pages share."""


class ReadOnlyAdmin:
    """History that changes only through the services: viewable, never edited in forms."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
