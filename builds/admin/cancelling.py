"""Cancelling builds from an admin page (the build page and its list's action, a concurrency
policy's queue): the permission, the service call reported as a message, and the POST view."""

from django.contrib import messages
from django.db.models import QuerySet
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect

from access import rules as access
from builds import services
from builds.models import Build
from ciproject.errors import CIError


class CancelsBuilds:
    """For a ModelAdmin whose pages cancel builds, with the permission the API asks for."""

    def has_cancel_permission(self, request, build: Build | None = None):
        """May cancel `build`; without one, whether the page offers cancelling at all."""
        if build is None:
            return access.may_somewhere(request.user, access.CANCEL)
        return access.may(request.user, access.CANCEL, build.pipeline)

    def cancel_build(self, request, build: Build) -> None:
        """Ask the service to cancel `build`; its answer, or its refusal, is a message."""
        try:
            status = services.request_cancel(build.pk, request.user)
        except CIError as exc:
            self.message_user(request, f"Build {build}: {exc.code}: {exc.detail}", messages.WARNING)
        else:
            self.message_user(request, f"Build {build}: {status}", messages.SUCCESS)

    def cancel_build_response(self, request, builds: QuerySet, build_id: int, next_url: str):
        """A POST view's answer: cancel the build `build_id` of `builds`, then go to
        `next_url`."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        build = get_object_or_404(builds.select_related("pipeline"), pk=build_id)
        access.require(request.user, access.CANCEL, build.pipeline)  # 404 to who sees nothing
        self.cancel_build(request, build)
        return redirect(next_url)
