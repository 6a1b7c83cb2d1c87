"""/metrics: the events the processes of this host observed (ciproject.metrics, summed from
the multiprocess files) and the scheduler's state, read from PostgreSQL at each scrape (the
database is the truth, whichever host a build or agent is on)."""

import hmac

from django.conf import settings
from django.db.models import Count
from django.http import HttpResponse, HttpResponseForbidden
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from agents.models import Agent, AgentLease, AgentStatus
from builds import partitions
from builds.models import Build, PartitionState, VariablePartition
from builds.statuses import BuildStatus


class StateCollector:
    def collect(self):
        builds = GaugeMetricFamily("ciproject_builds", "Builds by status.", labels=["status"])
        counts = dict(Build.objects.order_by().values_list("status").annotate(n=Count("id")))
        for status in BuildStatus.values:
            builds.add_metric([status], counts.get(status, 0))
        yield builds

        queues = GaugeMetricFamily(
            "ciproject_queue_length", "Queued builds per concurrency group.", labels=["group"]
        )
        queued = Build.objects.filter(status=BuildStatus.QUEUED).order_by()
        for group, n in queued.values_list("concurrency_group").annotate(n=Count("id")):
            queues.add_metric([group], n)
        yield queues

        agents = GaugeMetricFamily("ciproject_agents", "Agents by status.", labels=["status"])
        counts = dict(Agent.objects.order_by().values_list("status").annotate(n=Count("id")))
        for status in AgentStatus.values:
            agents.add_metric([status], counts.get(status, 0))
        yield agents

        yield GaugeMetricFamily(
            "ciproject_agent_leases", "Agents leased to a build.", value=AgentLease.objects.count()
        )
        live = [p for p in partitions.catalog() if not p.detach_pending]
        yield GaugeMetricFamily(
            "ciproject_variable_partitions_live", "Attached partitions.", value=len(live)
        )
        dropped = VariablePartition.objects.filter(state=PartitionState.DROPPED).count()
        yield GaugeMetricFamily(
            "ciproject_variable_partitions_dropped", "Partitions dropped so far.", value=dropped
        )


# Headers reverse proxies add. Behind one, every request comes from the proxy's address (often
# 127.0.0.1): a request carrying any of these came through it, from anywhere, so only the
# token lets it in; the address allow-list is for direct scrapes.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP", "Via")


def allowed(request) -> bool:
    token = settings.METRICS_TOKEN
    sent = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return True
    if any(header in request.headers for header in PROXY_HEADERS):
        return False
    return request.META.get("REMOTE_ADDR") in settings.METRICS_ALLOWED_IPS


def metrics_view(request):
    if not allowed(request):
        return HttpResponseForbidden(
            "PERMISSION_DENIED: /metrics answers METRICS_ALLOWED_IPS or a Bearer METRICS_TOKEN\n",
            content_type="text/plain",
        )
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(StateCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
