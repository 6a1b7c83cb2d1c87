"""/api/pipelines/{id}/repository/: the pipeline's repository (PUT answers the webhook secret
the first time only; rotate-secret/ makes a new one); /api/pipelines/{id}/hooks/{forge}/: the
forges' webhooks, authenticated by their signatures alone; /api/pipelines/{id}/run/: a build
of a branch's head or of a commit."""

from django.conf import settings
from django.urls import path, re_path
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import permissions, serializers, status, viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from access import rules as access
from builds.models import Build, Pipeline
from ciproject.api import ErrorSerializer
from ciproject.permissions import PIPELINE_DOOR
from forge.errors import WebhookTooLarge
from forge.models import Forge, Repository
from forge.services import hooks, repositories, runs

PIPELINE_ID = OpenApiParameter("pipeline_id", int, OpenApiParameter.PATH)


class RepositorySerializer(serializers.ModelSerializer):
    class Meta:
        model = Repository
        fields = ["forge", "clone_url", "default_branch", "api_url", "clone_username"]
        fields += ["clone_secret", "status_secret", "webhook_secret_set_at", "updated_at"]


class RepositoryAnswerSerializer(RepositorySerializer):
    webhook_secret = serializers.CharField(
        required=False, help_text="only in the answer that made it: keep it, it is not shown again"
    )

    class Meta(RepositorySerializer.Meta):
        fields = [*RepositorySerializer.Meta.fields, "webhook_secret"]


class RepositoryRequestSerializer(serializers.Serializer):
    forge = serializers.ChoiceField(Forge.values)
    clone_url = serializers.CharField()
    default_branch = serializers.CharField(required=False)
    api_url = serializers.CharField(required=False, allow_blank=True)
    clone_username = serializers.CharField(required=False, allow_blank=True)
    clone_secret = serializers.CharField(required=False, allow_blank=True)
    status_secret = serializers.CharField(required=False, allow_blank=True)


class WebhookSecretSerializer(serializers.Serializer):
    webhook_secret = serializers.CharField()


class RunSerializer(serializers.Serializer):
    branch = serializers.CharField(required=False, default="", allow_blank=True)
    commit = serializers.CharField(required=False, default="", allow_blank=True)
    variables = serializers.DictField(child=serializers.JSONField(), required=False, default=dict)


class RunAnswerSerializer(serializers.ModelSerializer):
    class Meta:
        model = Build
        fields = ["id", "number", "pipeline", "status", "source", "created_at"]


class RepositoryViewSet(viewsets.ViewSet):
    permission_classes = PIPELINE_DOOR  # and access.rules, pipeline by pipeline

    needs = dict.fromkeys(["put", "delete", "rotate_secret"], access.EDIT_REPOSITORY)

    def _pipeline(self) -> Pipeline:
        needed = self.needs.get(self.action, access.VIEW_REPOSITORY)
        return access.pipeline_for(self.request.user, needed, self.kwargs["pipeline_id"])

    @extend_schema(parameters=[PIPELINE_ID], responses=RepositorySerializer, summary="Repository")
    def list(self, request, pipeline_id=None):
        repository = runs.repository_of(self._pipeline())
        return Response(RepositorySerializer(repository).data)

    @extend_schema(
        parameters=[PIPELINE_ID],
        request=RepositoryRequestSerializer,
        responses={
            200: RepositoryAnswerSerializer,
            201: RepositoryAnswerSerializer,
            400: OpenApiResponse(ErrorSerializer, "INVALID_REPOSITORY"),
        },
        summary="Set the pipeline's repository (the first answer carries the webhook secret)",
    )
    def put(self, request, pipeline_id=None):
        body = RepositoryRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        repository, secret = repositories.set_repository(self._pipeline(), request.data)
        answer = RepositorySerializer(repository).data
        if secret is None:
            return Response(answer)
        return Response(answer | {"webhook_secret": secret}, status=status.HTTP_201_CREATED)

    @extend_schema(parameters=[PIPELINE_ID], responses={204: None}, summary="Remove it")
    def delete(self, request, pipeline_id=None):
        repositories.delete_repository(runs.repository_of(self._pipeline()))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        parameters=[PIPELINE_ID],
        request=None,
        responses=WebhookSecretSerializer,
        summary="Make a new webhook secret (the old one stops working)",
    )
    def rotate_secret(self, request, pipeline_id=None):
        repository = runs.repository_of(self._pipeline())
        return Response({"webhook_secret": repositories.rotate_webhook_secret(repository)})


class WebhookView(APIView):
    """A forge's webhook. No user: the forge's signature over the raw body is the only
    credential, so no session, token or CSRF check applies."""

    authentication_classes = []
    permission_classes = [permissions.AllowAny]
    throttle_classes = []

    @extend_schema(
        request={"application/json": dict},
        responses={
            200: OpenApiResponse(description="pong, ignored (saying why), or a replayed build"),
            201: OpenApiResponse(description="a build was made"),
            400: OpenApiResponse(ErrorSerializer, "WEBHOOK_INVALID_PAYLOAD, ..."),
            401: OpenApiResponse(ErrorSerializer, "WEBHOOK_SIGNATURE_INVALID, ..._MISSING"),
            413: OpenApiResponse(ErrorSerializer, "WEBHOOK_TOO_LARGE"),
        },
        summary="A forge's webhook (GitHub, GitLab, Gitea)",
    )
    def post(self, request, pipeline_id=None, forge=None):
        limit = settings.WEBHOOK_MAX_BODY_BYTES
        body = request._request.read(limit + 1)  # the raw body: what the signature is over
        if len(body) > limit:
            raise WebhookTooLarge(f"the webhook's body is larger than {limit} bytes")
        answer = hooks.receive(int(pipeline_id), forge, request.headers, body)
        return Response(answer.body, status=answer.status)


class RunView(APIView):
    permission_classes = PIPELINE_DOOR  # and access.rules, pipeline by pipeline
    needs = {"post": access.TRIGGER}

    @extend_schema(
        parameters=[PIPELINE_ID],
        request=RunSerializer,
        responses={
            201: RunAnswerSerializer,
            200: OpenApiResponse(RunAnswerSerializer, "made earlier with this Idempotency-Key"),
            404: OpenApiResponse(ErrorSerializer, "REPOSITORY_NOT_FOUND, BRANCH_NOT_FOUND"),
        },
        summary="Run now: a build of a branch's head, or of a commit",
    )
    def post(self, request, pipeline_id=None):
        body = RunSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        build, replayed = runs.run_now(
            access.pipeline_for(request.user, self.needs["post"], pipeline_id),
            body.validated_data["branch"],
            body.validated_data["commit"],
            body.validated_data["variables"],
            request.user,
            idempotency_key=request.headers.get("Idempotency-Key", ""),
        )
        answer = RunAnswerSerializer(build).data
        return Response(answer, status=status.HTTP_200_OK if replayed else status.HTTP_201_CREATED)


repository = RepositoryViewSet.as_view({"get": "list", "put": "put", "delete": "delete"})
urlpatterns = [
    path("pipelines/<int:pipeline_id>/repository/", repository, name="repository"),
    path(
        "pipelines/<int:pipeline_id>/repository/rotate-secret/",
        RepositoryViewSet.as_view({"post": "rotate_secret"}),
        name="repository-rotate-secret",
    ),
    re_path(
        rf"^pipelines/(?P<pipeline_id>[0-9]+)/hooks/(?P<forge>{'|'.join(Forge.values)})/$",
        WebhookView.as_view(),
        name="webhook",
    ),
    path("pipelines/<int:pipeline_id>/run/", RunView.as_view(), name="run-now"),
]
