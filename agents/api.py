from rest_framework import serializers, viewsets

from agents.models import Agent
from ciproject.api import router


class AgentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Agent
        fields = ["id", "name", "hostname", "labels", "capacity", "status", "version"]
        fields += ["started_at", "last_heartbeat"]


class AgentViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Agent.objects.all()
    serializer_class = AgentSerializer
    lookup_value_regex = r"[0-9]+"


router.register("agents", AgentViewSet)
