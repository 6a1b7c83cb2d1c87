"""Group keys: the server decides what it puts in them. A trigger cannot pick its build's
concurrency group by setting a variable named as a built-in (measured before the fix: a
`{"pipeline_id": "elsewhere"}` trigger escaped a full `max_running: 1, queue_length: 0`
group, and one naming another pipeline's id joined that pipeline's group, where
cancel_in_progress cancelled its builds)."""

import pytest

from builds import services
from builds.definition import parse_definition
from builds.errors import InvalidPipeline, InvalidVariables
from builds.models import Build
from concurrency import keys
from concurrency.errors import PipelineQueueFull
from concurrency.models import ConcurrencyPolicy
from tests.support import PARALLEL, client_for, make_pipeline

pytestmark = pytest.mark.django_db


@pytest.fixture
def full_group():
    """A pipeline whose group runs one build and queues none, with its one build running."""
    policy = ConcurrencyPolicy.objects.create(
        name="one", max_running=1, queue_length=0, queue_timeout=60
    )
    pipeline = make_pipeline("deploy", PARALLEL)
    pipeline.policy = policy
    pipeline.save()
    services.trigger_build(pipeline)
    return pipeline


@pytest.mark.parametrize("name", ["pipeline_id", "pipeline_name", "PIPELINE_ID"])
def test_a_trigger_cannot_set_what_the_server_puts_in_a_group_key(full_group, name):
    with pytest.raises(InvalidVariables) as refused:
        services.trigger_build(full_group, {name: "elsewhere"})
    assert refused.value.code == "INVALID_VARIABLES"
    assert f"variables.{name}: reserved" in refused.value.detail
    with pytest.raises(PipelineQueueFull):  # without it, the group is as full as it was
        services.trigger_build(full_group, {})
    assert Build.objects.count() == 1


def test_the_api_refuses_it_with_its_code_and_makes_no_build(full_group):
    api = client_for("builds.add_build")
    response = api.post(
        f"/api/pipelines/{full_group.pk}/builds/",
        {"variables": {"pipeline_id": str(full_group.pk + 1)}},
        format="json",
    )
    assert (response.status_code, response.json()["code"]) == (400, "INVALID_VARIABLES")
    assert Build.objects.count() == 1


def test_a_definition_cannot_default_them_either():
    with pytest.raises(InvalidPipeline, match="pipeline_name: reserved"):
        parse_definition(
            "variables: {pipeline_name: other}\n"
            "stages: [{name: s, jobs: [{id: j, steps: [{run: 'true'}]}]}]\n"
        )


def test_the_server_values_win_when_rendering_whatever_the_variables_say():
    pipeline = make_pipeline("web", PARALLEL)
    template = "${pipeline_id}/${pipeline_name}/${BRANCH}"
    rendered = keys.render(template, pipeline, {"pipeline_id": "9", "BRANCH": "main"})
    assert rendered == f"{pipeline.pk}/web/main"
