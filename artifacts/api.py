"""Artifacts over HTTP.

/api/agent/artifacts/: the agents' side, authorised by a job attempt's token
(`Authorization: Job TOKEN`, vault.tokens), valid while that attempt runs: PUT upload/?path=
streams one file in (its sha256 in `X-Artifact-Sha256`), GET lists what the attempt gets from
the jobs it waits for, GET {id}/ streams one of those.

/api/builds/{id}/artifacts/: people's side, with the permission to read the build's logs
(view_build): the list, and each file."""

import posixpath

from django.contrib.auth.models import AnonymousUser
from django.http import FileResponse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, permissions, serializers, status, viewsets
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.decorators import action
from rest_framework.response import Response

from access import rules as access
from artifacts import services
from artifacts.models import Artifact
from builds.models import Build
from ciproject.api import ErrorSerializer, router
from ciproject.permissions import PIPELINE_DOOR
from vault import tokens

SHA256_HEADER = "X-Artifact-Sha256"
ARTIFACT_ID = OpenApiParameter("id", int, OpenApiParameter.PATH)
BUILD_ID = OpenApiParameter("build_id", int, OpenApiParameter.PATH)


class JobAttemptAuthentication(BaseAuthentication):
    keyword = b"job"

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        found = tokens.attempt_of(parts[1].decode("latin-1")) if len(parts) == 2 else None
        if found is None:
            raise exceptions.AuthenticationFailed("not a job attempt's token")
        return AnonymousUser(), found  # request.auth: (job id, attempt)

    def authenticate_header(self, request):
        return "Job"


class JobAttemptScheme(OpenApiAuthenticationExtension):
    target_class = JobAttemptAuthentication
    name = "jobAttemptToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Job TOKEN`: the token a running job attempt was sealed",
        }


class HoldsJobToken(permissions.BasePermission):
    def has_permission(self, request, view):
        return isinstance(request.auth, tuple)


class ArtifactSerializer(serializers.ModelSerializer):
    job = serializers.CharField(source="job.key", read_only=True)
    expired = serializers.SerializerMethodField()

    class Meta:
        model = Artifact
        fields = ["id", "job", "job_id", "attempt", "path", "size", "sha256", "created_at"]
        fields += ["expires_at", "expired"]

    def get_expired(self, artifact) -> bool:
        return artifact.expired_at is not None


DOWNLOAD_BLOCK_BYTES = 1024 * 1024


def download(artifact: Artifact) -> FileResponse:
    response = FileResponse(
        services.storage().open(artifact.stored_as, "rb"),
        as_attachment=True,
        filename=posixpath.basename(artifact.path),
    )
    # Big blocks: each goes from a web thread to the event loop (ciproject.asgi) on its own.
    response.block_size = DOWNLOAD_BLOCK_BYTES
    response[SHA256_HEADER] = artifact.sha256
    return response


class AgentArtifactViewSet(viewsets.ViewSet):
    lookup_value_regex = r"[0-9]+"
    authentication_classes = [JobAttemptAuthentication]
    permission_classes = [HoldsJobToken]

    def _job(self, request):
        return services.running_attempt(*request.auth)

    @extend_schema(
        responses=ArtifactSerializer(many=True), summary="Artifacts a running job attempt gets"
    )
    def list(self, request):
        found = services.given_to(self._job(request))
        return Response(ArtifactSerializer(found, many=True).data)

    @extend_schema(
        parameters=[ARTIFACT_ID],
        responses={(200, "application/octet-stream"): bytes},
        summary="Download one",
    )
    def retrieve(self, request, pk=None):
        return download(services.for_download(pk, job=self._job(request)))

    @extend_schema(
        parameters=[OpenApiParameter("path", str, required=True)],
        request={"application/octet-stream": bytes},
        responses={
            201: ArtifactSerializer,
            400: OpenApiResponse(ErrorSerializer, "INVALID_ARTIFACT, ARTIFACT_INCOMPLETE, ..."),
            409: OpenApiResponse(ErrorSerializer, "JOB_NOT_RUNNING"),
            413: OpenApiResponse(ErrorSerializer, "ARTIFACT_TOO_LARGE"),
        },
        summary="Upload one file of a running job attempt",
    )
    @action(detail=False, methods=["put"], url_path="upload")
    def upload(self, request):
        try:
            length = int(request.META.get("CONTENT_LENGTH") or "")
        except ValueError:
            length = None
        artifact = services.receive(
            *request.auth,
            request.query_params.get("path"),
            request._request,  # the raw body, read as it arrives (no parser sees it)
            length,
            request.headers.get(SHA256_HEADER),
        )
        return Response(ArtifactSerializer(artifact).data, status=status.HTTP_201_CREATED)


class BuildArtifactViewSet(viewsets.ViewSet):
    lookup_value_regex = r"[0-9]+"

    permission_classes = PIPELINE_DOOR  # and access.rules, pipeline by pipeline

    def _build(self, build_id) -> Build:
        build = Build.objects.select_related("pipeline").filter(pk=build_id).first()
        if build is None:
            raise exceptions.NotFound(f"no build {build_id}")
        access.require(self.request.user, access.VIEW_BUILDS, build.pipeline)
        return build

    @extend_schema(
        parameters=[BUILD_ID],
        responses=ArtifactSerializer(many=True),
        summary="List a build's artifacts",
    )
    def list(self, request, build_id=None):
        found = Artifact.objects.filter(build=self._build(build_id)).select_related("job")
        return Response(ArtifactSerializer(found, many=True).data)

    @extend_schema(
        parameters=[BUILD_ID, ARTIFACT_ID],
        responses={(200, "application/octet-stream"): bytes},
        summary="Download one of a build's artifacts",
    )
    def retrieve(self, request, build_id=None, pk=None):
        return download(services.for_download(pk, build_id=self._build(build_id).pk))


router.register(r"agent/artifacts", AgentArtifactViewSet, basename="agent-artifact")
router.register(
    r"builds/(?P<build_id>[0-9]+)/artifacts", BuildArtifactViewSet, basename="build-artifact"
)
