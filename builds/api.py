from django.db.models import Prefetch
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from access import rules as access
from access.errors import TeamNotAllowed
from access.models import Team
from builds import services
from builds.errors import (
    BuildAlreadyFinished,
    BuildNotRetryable,
    IdempotencyKeyReused,
    LogStreamUnavailable,
    PipelineNameTaken,
    RetryWindowExpired,
    StepNotRetryable,
)
from builds.models import Build, JobRun, Pipeline, StepRun
from builds.stages import group_stages
from ciproject.api import ErrorSerializer, router
from ciproject.errors import CIError
from ciproject.permissions import PIPELINE_DOOR
from concurrency.errors import PipelineQueueFull
from concurrency.services import queue_positions


class PipelineSerializer(serializers.ModelSerializer):
    parameters = serializers.SerializerMethodField(
        help_text="what a trigger may set: each name with its description, default, required,"
        " choices and pattern (builds.parameters)"
    )

    teams = serializers.SlugRelatedField(
        many=True,
        slug_field="name",
        queryset=Team.objects.all(),
        required=False,
        help_text="the teams it belongs to, by name: their members reach it by their role",
    )

    class Meta:
        model = Pipeline
        fields = ["id", "name", "definition", "parameters", "teams", "last_build_number"]
        fields += ["created_at", "updated_at"]
        read_only_fields = ["last_build_number", "created_at", "updated_at"]
        # The service validates (and refuses a taken name with its own code).
        extra_kwargs = {"definition": {"trim_whitespace": False}, "name": {"validators": []}}

    def get_parameters(self, pipeline) -> dict:
        return pipeline.parameters

    def create(self, validated_data):
        editor = self.context["request"].user
        teams = validated_data.get("teams")
        if not (teams or editor.has_perm("builds.add_pipeline")):
            raise TeamNotAllowed("teams: name a team you maintain, whose pipeline this is")
        return services.save_pipeline(
            validated_data["name"], validated_data["definition"], editor=editor, teams=teams
        )

    def update(self, instance, validated_data):
        return services.save_pipeline(
            validated_data.get("name", instance.name),
            validated_data.get("definition", instance.definition),
            pipeline=instance,
            editor=self.context["request"].user,
            teams=validated_data.get("teams"),
        )


class TriggerSerializer(serializers.Serializer):
    # Any JSON value: the service checks it (normalize_variables), so a wrong shape gets
    # INVALID_VARIABLES like a wrong name or value does; null means none, as when omitted.
    variables = serializers.JSONField(
        required=False, default=dict, allow_null=True, help_text="names to scalar values"
    )
    priority = serializers.IntegerField(
        required=False,
        default=None,
        allow_null=True,
        help_text="its place in its concurrency group's queue, higher first: from 0 to the"
        " pipeline's max-priority (null: the pipeline's priority)",
    )


class StepSerializer(serializers.ModelSerializer):
    class Meta:
        model = StepRun
        fields = ["id", "name", "status", "attempt", "exit_code", "reason", "started_at"]
        fields += ["finished_at"]
        # What the definition set: its condition, timeout, automatic retries (and their
        # rule), limits.
        fields += ["condition", "timeout", "max_retries", "retry_rule", "max_processes"]
        fields += ["max_memory", "kill_grace"]


class JobSerializer(serializers.ModelSerializer):
    steps = StepSerializer(many=True)

    class Meta:
        model = JobRun
        fields = [
            "id", "key", "status", "attempt", "agent", "kept_workspace_on", "timeout",
            "reason", "started_at", "finished_at",
            # Its order (builds.dag): the jobs it needs (null: the earlier stages), its
            # condition, and a matrix run's job and values.
            "needs", "condition", "matrix_of", "matrix",
        ]  # fmt: skip
        fields += ["steps"]


class StageSerializer(serializers.Serializer):
    name = serializers.CharField()
    status = serializers.CharField()
    jobs = JobSerializer(many=True)


class RetrySerializer(serializers.Serializer):
    failed_only = serializers.BooleanField(
        default=True, help_text="re-run the failed jobs and what follows (else every job)"
    )


class CancelSerializer(serializers.Serializer):
    status = serializers.CharField()


class QueueSerializer(serializers.Serializer):
    position = serializers.IntegerField(help_text="1-based, in the order the queue starts them")
    of = serializers.IntegerField(help_text="how many builds its group has queued")
    estimated_start = serializers.DateTimeField(
        allow_null=True,
        help_text="from the running builds and the median durations of the pipelines' recent"
        " builds (concurrency.services.queue_positions); null without their history",
    )


class BuildListSerializer(serializers.ListSerializer):
    """A list of builds: the queue places of its queued builds in one go, not per build."""

    def to_representation(self, data):
        builds = list(data.all() if hasattr(data, "all") else data)
        self.child.queue_places = queue_positions.queue_places(builds)
        return super().to_representation(builds)


class BuildSummarySerializer(serializers.ModelSerializer):
    queue = serializers.SerializerMethodField(
        help_text="its place in its concurrency group's queue while QUEUED, else null"
    )
    queue_places = None  # set by BuildListSerializer for the builds of a list

    class Meta:
        model = Build
        fields = ["id", "number", "pipeline", "status", "attempt", "priority", "created_at"]
        fields += ["started_at", "finished_at", "queue"]
        list_serializer_class = BuildListSerializer

    @extend_schema_field(QueueSerializer(allow_null=True))
    def get_queue(self, build) -> dict | None:
        if self.queue_places is not None:
            place = self.queue_places.get(build.pk)
        else:
            place = queue_positions.queue_place(build)
        return None if place is None else QueueSerializer(place).data


class BuildSerializer(BuildSummarySerializer):
    variables = serializers.SerializerMethodField()
    stages = serializers.SerializerMethodField()

    class Meta(BuildSummarySerializer.Meta):
        fields = [*BuildSummarySerializer.Meta.fields, "reason", "source", "variables", "stages"]

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
    def get_variables(self, build) -> dict:
        return {v.name: v.value for v in build.variables.all()}

    @extend_schema_field(StageSerializer(many=True))
    def get_stages(self, build) -> list:
        return StageSerializer(group_stages(build.jobs.all()), many=True).data


def conflict(*errors: type[CIError]) -> OpenApiResponse:
    """A 409 in the error format, naming the codes of the errors it may carry."""
    codes = ", ".join(error.code for error in errors)
    return OpenApiResponse(ErrorSerializer, description=f"conflict: {codes}")


@extend_schema_view(
    create=extend_schema(responses={201: PipelineSerializer, 409: conflict(PipelineNameTaken)}),
    update=extend_schema(responses={200: PipelineSerializer, 409: conflict(PipelineNameTaken)}),
    partial_update=extend_schema(
        responses={200: PipelineSerializer, 409: conflict(PipelineNameTaken)}
    ),
)
class PipelineViewSet(
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.ListModelMixin,
    viewsets.GenericViewSet,
):
    queryset = Pipeline.objects.all()
    serializer_class = PipelineSerializer
    lookup_value_regex = r"[0-9]+"  # ids only: /pipelines/abc/ is a 404, not a ValueError
    permission_classes = PIPELINE_DOOR  # and access.rules, pipeline by pipeline

    def get_queryset(self):
        if self.action == "list":
            return access.pipelines_for(self.request.user, access.VIEW_PIPELINE)
        queryset = access.with_team_ids(super().get_queryset())
        return queryset if self.action == "builds" else queryset.prefetch_related("teams")

    # What each unsafe action needs (POST builds/: a trigger); reads, what get_object says.
    needs = {
        "create": access.EDIT,  # and access.may_create_pipelines
        "update": access.EDIT,
        "partial_update": access.EDIT,
        "builds": access.TRIGGER,
    }

    def get_object(self):
        pipeline = super().get_object()
        if self.request.method not in permissions.SAFE_METHODS:
            needed = self.needs[self.action]
        elif self.action == "builds":
            needed = access.VIEW_BUILDS
        else:
            needed = access.VIEW_PIPELINE
        access.require(self.request.user, needed, pipeline)
        return pipeline

    def create(self, request, *args, **kwargs):
        if not access.may_create_pipelines(request.user):
            raise exceptions.PermissionDenied("you may not create pipelines")
        return super().create(request, *args, **kwargs)

    @extend_schema(
        methods=["POST"],
        request=TriggerSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="a key of the client's (a UUID): the same trigger sent again"
                " answers 200 with the build the first one made, and makes no other",
            )
        ],
        responses={
            201: BuildSummarySerializer,
            200: OpenApiResponse(BuildSummarySerializer, "made earlier with this key"),
            409: conflict(PipelineQueueFull, IdempotencyKeyReused),
        },
        summary="Trigger a build",
    )
    @extend_schema(methods=["GET"], responses=BuildSummarySerializer(many=True))
    @action(detail=True, methods=["get", "post"])
    def builds(self, request, pk=None):
        pipeline = self.get_object()
        if request.method == "GET":
            page = self.paginate_queryset(pipeline.builds.all())
            return self.get_paginated_response(BuildSummarySerializer(page, many=True).data)
        trigger = TriggerSerializer(data=request.data)
        trigger.is_valid(raise_exception=True)
        build, replayed = services.trigger(
            pipeline,
            trigger.validated_data["variables"],
            request.user,
            idempotency_key=request.headers.get("Idempotency-Key", ""),
            priority=trigger.validated_data["priority"],
        )
        if replayed:
            headers = {"Idempotent-Replayed": "true"}
            return Response(BuildSummarySerializer(build).data, status.HTTP_200_OK, headers=headers)
        return Response(BuildSummarySerializer(build).data, status=status.HTTP_201_CREATED)


# Set in a request's environ (META) by builds.follow, whose stream follows this answer.
STREAMING = "ciproject.streaming"


class FollowAllowed(HttpResponse):
    """The log action's answer to `?follow=1` once the caller may read the step's log."""

    def __init__(self, step_id: int, attempt: int):
        super().__init__(status=200)
        self.step_id, self.attempt = step_id, attempt


class BuildViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Build.objects.select_related("pipeline")
    lookup_value_regex = r"[0-9]+"  # the log action passes pk to get_object_or_404 itself

    def get_serializer_class(self):
        return BuildSerializer if self.action == "retrieve" else BuildSummarySerializer

    permission_classes = PIPELINE_DOOR  # and access.rules, pipeline by pipeline
    needs = {"cancel": access.CANCEL, "retry": access.RETRY, "retry_step": access.RETRY}

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.action == "list":
            visible = access.pipelines_for(self.request.user, access.VIEW_BUILDS)
            queryset = queryset.filter(pipeline__in=visible)
        if self.action in self.needs:  # the build is asked only who may act on it
            queryset = queryset.only("pipeline__id")
        if self.action == "retrieve":
            jobs = JobRun.objects.order_by("stage_index", "id").prefetch_related("steps")
            queryset = queryset.prefetch_related(Prefetch("jobs", jobs), "variables")
        return queryset

    def get_object(self):
        build = super().get_object()
        needed = self.needs.get(self.action, access.VIEW_BUILDS)
        access.require(self.request.user, needed, build.pipeline)
        return build

    @extend_schema(
        request=RetrySerializer,
        responses={
            202: BuildSummarySerializer,
            409: conflict(RetryWindowExpired, BuildNotRetryable, PipelineQueueFull),
        },
        summary="Retry a build",
    )
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        build = self.get_object()
        body = RetrySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        build = services.retry_build(build.pk, body.validated_data["failed_only"], request.user)
        return Response(BuildSummarySerializer(build).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=None,
        responses={202: StepSerializer, 409: conflict(StepNotRetryable)},
        summary="Retry a failed step",
    )
    @action(detail=True, methods=["post"], url_path=r"steps/(?P<step_id>[0-9]+)/retry")
    def retry_step(self, request, pk=None, step_id=None):
        build = self.get_object()
        step = services.retry_step(build.pk, int(step_id))
        return Response(StepSerializer(step).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=None,
        responses={202: CancelSerializer, 409: conflict(BuildAlreadyFinished)},
        summary="Cancel a build",
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        build = self.get_object()
        status_ = services.request_cancel(build.pk, request.user)
        return Response({"status": status_}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[
            OpenApiParameter("attempt", int, description="default: the latest"),
            OpenApiParameter(
                "follow",
                int,
                description="1: a Server-Sent Events stream of the attempt's log until it ends"
                " (builds.follow)",
            ),
        ],
        responses={
            (200, "text/plain"): OpenApiTypes.STR,
            406: OpenApiResponse(
                ErrorSerializer,
                description=f"{LogStreamUnavailable.code}: `follow` of a web run as bare WSGI",
            ),
        },
    )
    @action(detail=True, url_path=r"steps/(?P<step_id>[0-9]+)/log")
    def log(self, request, pk=None, step_id=None):
        build = self.get_object()
        step = get_object_or_404(StepRun, pk=step_id, job__build=build)
        attempt = request.query_params.get("attempt")
        attempt = int(attempt) if attempt and attempt.isdecimal() else None
        if request.query_params.get("follow", "") not in ("", "0", "false"):
            if not request.META.get(STREAMING):
                raise LogStreamUnavailable(
                    "this web process serves no streams: run it as deploy/Procfile does"
                    " (gunicorn -k ciproject.web.Worker ciproject.asgi:application)"
                )
            # Authorised: builds.follow streams it (this answer never reaches the client).
            return FollowAllowed(step.pk, attempt or step.attempt)
        text = services.step_log(step, attempt)
        return HttpResponse(text, content_type="text/plain; charset=utf-8")


router.register("pipelines", PipelineViewSet)
router.register("builds", BuildViewSet)
