"""/metrics: protected, and its figures move with what the scheduler does."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from agents import services as agent_services
from agents.models import Agent
from builds import partitions, services
from builds.errors import BuildNotRetryable
from builds.models import JobRun
from concurrency.errors import PipelineQueueFull
from concurrency.models import ConcurrencyPolicy
from tests.support import PARALLEL, REUSE, fail_fast_job, make_pipeline


def scrape(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


@pytest.mark.django_db
def test_metrics_answer_the_allow_list_or_the_token_only(client, settings):
    settings.METRICS_ALLOWED_IPS = ["10.9.9.9"]
    settings.METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
    response = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200
    assert b"ciproject_builds" in response.content
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 403
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]  # the test client's address
    assert client.get("/metrics").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_the_figures_move_with_triggers_queues_cancels_and_retries(client):
    before = scrape(client)
    policy = ConcurrencyPolicy.objects.create(name="p", group_key="g", max_running=1)
    pipeline = make_pipeline("web", PARALLEL)
    pipeline.policy = policy
    pipeline.save()
    running, queued = services.trigger_build(pipeline), services.trigger_build(pipeline)
    policy.queue_length = 1
    policy.save()
    with pytest.raises(PipelineQueueFull):
        services.trigger_build(pipeline)
    assert scrape(client)[("ciproject_queue_length", (("group", "g"),))] == 1
    services.retry_step(running.pk, fail_fast_job(running).pk)
    services.request_cancel(queued.pk)
    services.finish_cancel(queued.pk)
    with pytest.raises(BuildNotRetryable):
        services.retry_build(running.pk)  # still running
    agent_services.register_agent("m1", "host", ["x"], 1, "1")
    agent_services.register_agent("m2", "host", ["x"], 1, "1")
    silent_since = timezone.now() - timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS + 1)
    Agent.objects.filter(name="m2").update(last_heartbeat=silent_since)
    assert agent_services.mark_lost_agents() == ["m2"]
    after = scrape(client)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("ciproject_admissions_total", result="running") == 1
    assert moved("ciproject_admissions_total", result="queued") == 1
    assert moved("ciproject_admissions_total", result="rejected") == 1
    assert moved("ciproject_step_retries_total") == 1
    assert moved("ciproject_cancel_request_seconds_count") == 1
    assert moved("ciproject_cancel_to_canceled_seconds_count") == 1
    assert moved("ciproject_build_retries_refused_total", reason="BUILD_NOT_RETRYABLE") == 1
    assert after[("ciproject_builds", (("status", "RUNNING"),))] == 1
    assert after[("ciproject_builds", (("status", "CANCELED"),))] == 1
    assert ("ciproject_queue_length", (("group", "g"),)) not in after  # nothing queued now
    assert moved("ciproject_agents_lost_total") == 1
    assert after[("ciproject_agents", (("status", "online"),))] == 1
    assert after[("ciproject_agents", (("status", "offline"),))] == 1
    assert after[("ciproject_variable_partitions_live", ())] >= 1


@pytest.mark.usefixtures("no_old_partitions")
@pytest.mark.django_db(transaction=True)
def test_leases_and_partition_figures_move(client):
    before = scrape(client)
    agent_services.register_agent("m1", "host", ["unit-tests"], 1, "1")
    reuse = make_pipeline("reuse", REUSE)
    build = services.trigger_build(reuse)
    services.start_job(JobRun.objects.get(build=build, key="make").pk, 1, "m1")  # leases m1
    old = timezone.now() - timedelta(days=settings.VARIABLE_RETENTION_DAYS + 5)
    partitions.ensure(now=old, ahead=0)
    during = scrape(client)
    assert during[("ciproject_agent_leases", ())] == 1
    live = during[("ciproject_variable_partitions_live", ())]
    assert live == before[("ciproject_variable_partitions_live", ())] + 1

    assert len(partitions.purge(by="test").dropped) == 1
    after = scrape(client)
    assert after[("ciproject_variable_partitions_live", ())] == live - 1
    dropped = ("ciproject_variable_partitions_dropped", ())
    assert after[dropped] == before[dropped] + 1
    purges = ("ciproject_partition_purge_seconds_count", ())
    assert after[purges] == before.get(purges, 0) + 1
