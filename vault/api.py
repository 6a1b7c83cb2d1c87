"""/api/pipelines/{id}/secrets/: a pipeline's secrets by name, write-only. GET lists names
and who set them when; PUT sets or replaces a value (204); DELETE removes one (204). No
answer ever carries a value."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.response import Response

from access import rules as access
from builds.models import Pipeline
from ciproject.api import ErrorSerializer, router
from ciproject.permissions import PIPELINE_DOOR
from vault import services
from vault.models import Secret


class SecretSerializer(serializers.ModelSerializer):
    updated_by = serializers.StringRelatedField()

    class Meta:
        model = Secret
        fields = ["name", "updated_at", "updated_by"]


class SecretValueSerializer(serializers.Serializer):
    value = serializers.CharField(trim_whitespace=False, write_only=True)


class SecretViewSet(viewsets.ViewSet):
    lookup_field = "name"
    lookup_value_regex = r"[^/]+"  # any name reaches the service, which says what is wrong

    permission_classes = PIPELINE_DOOR  # and access.rules, pipeline by pipeline
    needs = {"update": access.SET_SECRET, "destroy": access.DELETE_SECRET}

    def _pipeline(self) -> Pipeline:
        needed = self.needs.get(self.action, access.VIEW_SECRETS)
        return access.pipeline_for(self.request.user, needed, self.kwargs["pipeline_id"])

    @extend_schema(responses=SecretSerializer(many=True), summary="List a pipeline's secrets")
    def list(self, request, pipeline_id=None):
        secrets = self._pipeline().secrets.select_related("updated_by")
        return Response(SecretSerializer(secrets, many=True).data)

    @extend_schema(
        request=SecretValueSerializer,
        responses={204: None, 400: OpenApiResponse(ErrorSerializer, "INVALID_SECRET")},
        summary="Set or replace a secret",
    )
    def update(self, request, pipeline_id=None, name=None):
        body = SecretValueSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        services.set_secret(
            self._pipeline(), name, body.validated_data["value"], request.user, "api"
        )
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        responses={204: None, 404: OpenApiResponse(ErrorSerializer, "SECRET_NOT_FOUND")},
        summary="Delete a secret",
    )
    def destroy(self, request, pipeline_id=None, name=None):
        services.delete_secret(self._pipeline(), name, request.user, "api")
        return Response(status=status.HTTP_204_NO_CONTENT)


router.register(r"pipelines/(?P<pipeline_id>[0-9]+)/secrets", SecretViewSet, basename="secret")
