"""A build node serves its own agents' metrics (ciproject_agent_*) on AGENT_METRICS_PORT: the
server's /metrics cannot read another host's files. Summed over the agent processes of this
host through prometheus-client's multiprocess files, each series labelled with its agent."""

import logging

from django.conf import settings
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)
PREFIX = "ciproject_agent_"


class AgentMetrics:
    """The agents' families only: on a machine that also runs the server (one-machine
    setups) the same files hold the server's events, which its /metrics serves."""

    def collect(self):
        for family in MultiProcessCollector(None).collect():
            if family.name.startswith(PREFIX):
                yield family


def serve(agent: str) -> None:
    port = settings.AGENT_METRICS_PORT
    if not port:
        return
    registry = CollectorRegistry()
    registry.register(AgentMetrics())
    try:
        start_http_server(port, addr=settings.AGENT_METRICS_ADDR, registry=registry)
    except OSError as exc:  # the port is taken: the agent runs jobs all the same
        log.error("agent %s: cannot serve metrics on port %s: %s", agent, port, exc)
        return
    log.info("agent %s: metrics on http://%s:%s/metrics", agent, settings.AGENT_METRICS_ADDR, port)
