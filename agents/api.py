from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers, viewsets

from agents.models import Agent
from builds.models import JobRun
from builds.statuses import RunStatus
from ciproject.api import router


class AgentSerializer(serializers.ModelSerializer):
    current_jobs = serializers.SerializerMethodField()

    class Meta:
        model = Agent
        fields = ["id", "name", "hostname", "labels", "capacity", "status", "version"]
        fields += ["containment"]
        fields += ["started_at", "last_heartbeat", "suspect_since", "suspect_reason"]
        fields += ["current_jobs"]

    @extend_schema_field({"type": "array", "items": {"type": "object"}})
    def get_current_jobs(self, agent) -> list[dict]:
        running = JobRun.objects.filter(agent=agent.name, status=RunStatus.RUNNING)
        return [
            {"job": job_id, "build": build_id, "key": key, "attempt": attempt}
            for job_id, build_id, key, attempt in running.values_list(
                "id", "build_id", "key", "attempt"
            )
        ]


class AgentViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Agent.objects.all()
    serializer_class = AgentSerializer
    lookup_value_regex = r"[0-9]+"


router.register("agents", AgentViewSet)
