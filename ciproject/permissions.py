"""API permissions: Django model permissions, and per-action requirements, each with the
request's API token's scope (tokens.permissions); and the pipelines' doors, where
access.rules decides object by object."""

from rest_framework import permissions

from tokens.permissions import TokenScope


class ModelPermissions(permissions.DjangoModelPermissions):
    """Django model permissions, reads included (view_<model>)."""

    perms_map = {
        **permissions.DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }


# A pipeline's door: signed in, within the token's scope (per route, before the view looks
# anything up); then access.rules.may per pipeline (which asks the token again, for that one).
PIPELINE_DOOR = [permissions.IsAuthenticated, TokenScope]


def requires(*perms: str) -> type[permissions.BasePermission]:
    """A permission class for one action: the user must hold all of `perms`."""

    # A view naming its own permissions drops DEFAULT_PERMISSION_CLASSES: the scope comes
    # along here, after the user's own rights (without them, a 403 whatever the token).
    class Requires(TokenScope):
        def has_permission(self, request, view):
            user = request.user
            if not (user and user.is_authenticated and user.has_perms(perms)):
                return False
            return super().has_permission(request, view)

    Requires.__name__ = f"Requires({', '.join(perms)})"
    return Requires
