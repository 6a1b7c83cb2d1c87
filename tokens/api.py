"""/api/tokens/: one's own API tokens (staff: everyone's, with ?all=1). POST makes one and
is the only answer that ever carries its value; DELETE revokes; POST .../rotate/ makes its
successor (the value once again) and revokes it."""

from django.contrib.auth import get_user_model
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from ciproject.api import ErrorSerializer, router
from tokens import services
from tokens.errors import InvalidToken
from tokens.errors import TokenScope as TokenScopeRefused
from tokens.models import ACTIONS, ApiToken, Kind
from tokens.permissions import TokenScope, request_token


class TokenSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="user.get_username", read_only=True)
    prefix = serializers.CharField(source="token_key", read_only=True)
    expired = serializers.SerializerMethodField()
    pipelines = serializers.SerializerMethodField()

    class Meta:
        model = ApiToken
        fields = ["id", "name", "owner", "kind", "prefix", "actions", "pipelines", "created"]
        fields += ["expiry", "expired", "last_used_at", "revoked_at", "legacy"]
        read_only_fields = fields

    def get_expired(self, token) -> bool:
        return token.expired()

    def get_pipelines(self, token) -> list[int]:
        return sorted(token.pipelines.values_list("pk", flat=True))


class CreatedTokenSerializer(TokenSerializer):
    token = serializers.CharField(help_text="the value: shown in this answer only, never again")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class TokenRequestSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    days = serializers.IntegerField(
        required=False, help_text="its lifetime (default API_TOKEN_DEFAULT_DAYS, at most _MAX_)"
    )
    actions = serializers.ListField(
        child=serializers.ChoiceField(ACTIONS),
        default=["read"],
        help_text=f"of {', '.join(ACTIONS)}; read is always included",
    )
    pipelines = serializers.ListField(
        child=serializers.IntegerField(), default=list, help_text="none: every pipeline"
    )
    kind = serializers.ChoiceField(Kind.choices, default=Kind.PERSONAL)
    owner = serializers.CharField(
        required=False, help_text="staff only: the (service account) user the token is for"
    )


class RotateSerializer(serializers.Serializer):
    days = serializers.IntegerField(required=False)


class TokenViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    # No model permission: everyone signed in keeps tokens of their own.
    permission_classes = [permissions.IsAuthenticated, TokenScope]
    # One's own tokens, no pipeline's (tokens.services keeps a token from making a wider
    # one; another's token, staff only).
    needs = dict.fromkeys(["create", "destroy", "rotate"], "edit")
    serializer_class = TokenSerializer
    lookup_value_regex = r"[0-9]+"

    def get_queryset(self):
        tokens = ApiToken.objects.select_related("user").prefetch_related("pipelines")
        user = self.request.user
        everyone = self.action != "list" or self.request.query_params.get("all") == "1"
        if user.is_staff and everyone:
            return tokens
        return tokens.filter(user=user)

    def _owner(self, body) -> object:
        user = self.request.user
        name = body.get("owner")
        if (name is None or name == user.get_username()) and body["kind"] == Kind.PERSONAL:
            return user
        if not user.is_staff:
            raise PermissionDenied("only staff make tokens for others, or service tokens")
        if name is None:
            raise InvalidToken("a service token names its service account: owner")
        owner = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: name}).first()
        if owner is None:
            raise InvalidToken(f"no user {name!r}")
        return owner

    def _created(self, token, value) -> Response:
        token.token = value
        return Response(CreatedTokenSerializer(token).data, status=status.HTTP_201_CREATED)

    @extend_schema(parameters=[OpenApiParameter("all", int, description="1: every user's (staff)")])
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(
        request=TokenRequestSerializer,
        responses={
            201: CreatedTokenSerializer,
            409: OpenApiResponse(ErrorSerializer, "TOKEN_NAME_TAKEN"),
        },
        summary="Make a token (its value is in this answer only)",
    )
    def create(self, request):
        body = TokenRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        token, value = services.create_token(
            self._owner(data),
            data["name"],
            actions=data["actions"],
            days=data.get("days"),
            pipelines=data["pipelines"],
            kind=data["kind"],
            made_with=request_token(request),
        )
        return self._created(token, value)

    @extend_schema(
        responses={204: None, 409: OpenApiResponse(ErrorSerializer, "TOKEN_ALREADY_REVOKED")},
        summary="Revoke a token (refused from the next request on)",
    )
    def destroy(self, request, pk=None):
        token = self._manageable()
        services.revoke_token(token, request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        request=RotateSerializer,
        responses={
            201: CreatedTokenSerializer,
            409: OpenApiResponse(ErrorSerializer, "TOKEN_ALREADY_REVOKED"),
        },
        summary="Rotate a token: its successor (value shown once), the old one revoked",
    )
    @action(detail=True, methods=["post"])
    def rotate(self, request, pk=None):
        token = self._manageable()
        body = RotateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        new, value = services.rotate_token(
            token,
            request.user,
            days=body.validated_data.get("days"),
            made_with=request_token(request),
        )
        return self._created(new, value)

    def _manageable(self) -> ApiToken:
        token = self.get_object()
        if not services.may_manage(self.request.user, token):  # the queryset sees to it too
            raise PermissionDenied("only its owner and staff manage a token")
        used = request_token(self.request)
        if token.user_id != self.request.user.pk and used is not None and not used.allows("staff"):
            raise TokenScopeRefused("another user's token: only with a token that has staff")
        return token


router.register("tokens", TokenViewSet, basename="token")
