"""GET /api/agents/: the registry, with what each agent runs now."""

import pytest

from agents import services
from builds import services as builds
from builds.models import JobRun
from tests.support import client_for, make_pipeline, one_step


@pytest.mark.django_db
def test_agents_are_listed_with_their_current_jobs():
    services.register_agent("a1", "host-1", ["linux", "default"], 2, "1.0")
    services.register_agent("a2", "host-2", ["gpu"], 1, "1.0")
    build = builds.trigger_build(make_pipeline("p", one_step("true", "linux")))
    job = JobRun.objects.get(build=build)
    builds.start_job(job.pk, 1, "a1")

    response = client_for("agents.view_agent").get("/api/agents/")
    assert response.status_code == 200
    agents = {a["name"]: a for a in response.json()["results"]}
    assert set(agents) == {"a1", "a2"}
    assert (agents["a1"]["labels"], agents["a1"]["capacity"]) == (["linux", "default"], 2)
    assert agents["a1"]["status"] == "online"
    assert agents["a1"]["current_jobs"] == [
        {"job": job.pk, "build": build.pk, "key": job.key, "attempt": 1}
    ]
    assert agents["a2"]["current_jobs"] == []
    assert client_for().get("/api/agents/").status_code == 403
