"""Artifacts in the admin: listed (and on their build's page), each downloadable by whoever
may read the build's logs (access.rules). They change only through the services."""

from django.contrib import admin
from django.http import Http404
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html

from access import rules as access
from access.admin_mixins import PipelineScoped
from artifacts import services
from artifacts.api import download
from artifacts.errors import ArtifactExpired, ArtifactNotFound
from artifacts.models import Artifact
from ciproject.admin_mixins import ReadOnlyAdmin
from ciproject.sizes import format_size


@admin.register(Artifact)
class ArtifactAdmin(ReadOnlyAdmin, PipelineScoped, admin.ModelAdmin):
    change_action = None
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

    pipeline_field = "build__pipeline"  # shown to who may see the build's logs

    def get_urls(self):
        download_view = self.admin_site.admin_view(self.download_view)
        return [
            path("<int:artifact_id>/download/", download_view, name="artifacts_artifact_download"),
            *super().get_urls(),
        ]

    def download_view(self, request, artifact_id):
        artifact = get_object_or_404(
            Artifact.objects.select_related("build__pipeline"), pk=artifact_id
        )
        access.require(request.user, access.VIEW_BUILDS, artifact.build.pipeline)
        try:
            return download(services.for_download(artifact_id))
        except (ArtifactNotFound, ArtifactExpired):
            raise Http404("no such artifact, or it has expired") from None
