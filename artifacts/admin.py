"""Artifacts in the admin: listed (and on their build's page), each downloadable by whoever
may read the build's logs (view_build). They change only through the services."""

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.urls import path, reverse
from django.utils.html import format_html

from artifacts import services
from artifacts.api import download
from artifacts.errors import ArtifactExpired, ArtifactNotFound
from artifacts.models import Artifact
from ciproject.admin_mixins import ReadOnlyAdmin
from ciproject.sizes import format_size


@admin.register(Artifact)
class ArtifactAdmin(ReadOnlyAdmin, admin.ModelAdmin):
    list_display = ["path", "build", "job_key", "attempt", "size_display", "sha256"]
    list_display += ["expires_at", "download_link"]
    list_filter = ["expired_at", "created_at"]
    search_fields = ["path", "build__pipeline__name"]
    list_select_related = ["build__pipeline", "job"]
    fields = readonly_fields = ["build", "job", "attempt", "path", "size_display", "sha256"]
    readonly_fields += ["created_at", "expires_at", "expired_at", "download_link"]

    @admin.display(description="job")
    def job_key(self, artifact):
        return artifact.job.key

    @admin.display(description="size", ordering="size")
    def size_display(self, artifact):
        return format_size(artifact.size)

    @admin.display(description="file")
    def download_link(self, artifact):
        if artifact.expired_at:
            return "expired"
        url = reverse("admin:artifacts_artifact_download", args=[artifact.pk])
        return format_html('<a href="{}">download</a>', url)

    def has_view_permission(self, request, obj=None):
        return request.user.has_perm("builds.view_build")

    def get_urls(self):
        download_view = self.admin_site.admin_view(self.download_view)
        return [
            path("<int:artifact_id>/download/", download_view, name="artifacts_artifact_download"),
            *super().get_urls(),
        ]

    def download_view(self, request, artifact_id):
        if not request.user.has_perm("builds.view_build"):
            raise PermissionDenied
        try:
            return download(services.for_download(artifact_id))
        except (ArtifactNotFound, ArtifactExpired):
            raise Http404("no such artifact, or it has expired") from None
