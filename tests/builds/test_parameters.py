"""Declared parameters (`parameters:`): what a trigger may set, refused or accepted the same
way at every door (the service, the API, `manage.py trigger`, the admin's form), and nothing
stored when refused. Without `parameters:`, a trigger sets only the pipeline's `variables:`."""

from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from builds import services
from builds.definition import parse_definition
from builds.errors import InvalidPipeline, InvalidVariables
from builds.models import Build, BuildVariable, Pipeline
from tests.support import client_for

pytestmark = pytest.mark.django_db

DEFINITION = """\
variables:
  COLOR: blue
parameters:
  TARGET:
    description: where it goes
    choices: [staging, production]
    required: true
  BRANCH:
    default: main
    pattern: "[a-z][a-z0-9/_-]{0,99}"
  NOTE: {}
stages:
  - name: s
    jobs:
      - {id: j, runs-on: unit-tests, steps: [{run: 'echo "$TARGET $BRANCH"'}]}
"""

REFUSED = [
    ({"BRANCH": "main"}, "variables.TARGET: required, and not given"),
    ({"TARGET": "prod"}, "variables.TARGET: 'prod' is not one of its choices ('staging', "),
    ({"TARGET": "staging", "BRANCH": "Main"}, "variables.BRANCH: 'Main' does not match its"),
    ({"TARGET": "staging", "BRANCH": "main\nx"}, "variables.BRANCH: 'main\\nx' does not match"),
    ({"TARGET": "staging", "NODE_OPTIONS": "-r /x.js"}, "variables.NODE_OPTIONS: not a parameter"),
    ({"TARGET": "staging", "COLOR": "red"}, "variables.COLOR: not a parameter of this pipeline"),
]  # fmt: skip


@pytest.fixture
def pipeline():
    return services.save_pipeline("deploy", DEFINITION)


def stored(build) -> dict[str, tuple[str, str]]:
    rows = BuildVariable.objects.filter(build=build)
    return {row.name: (row.value, row.source) for row in rows}


def test_the_spec_keeps_the_parameters_in_order(pipeline):
    assert list(pipeline.spec["parameters"]) == ["TARGET", "BRANCH", "NOTE"]
    assert pipeline.spec["parameters"]["TARGET"] == {
        "description": "where it goes",
        "default": None,
        "required": True,
        "choices": ["staging", "production"],
        "pattern": None,
    }


def test_a_trigger_sets_parameters_and_the_rest_are_defaults(pipeline):
    build = services.trigger_build(pipeline, {"TARGET": "production", "NOTE": "hotfix"})
    assert stored(build) == {
        "COLOR": ("blue", "pipeline"),
        "BRANCH": ("main", "pipeline"),
        "TARGET": ("production", "trigger"),
        "NOTE": ("hotfix", "trigger"),
    }


@pytest.mark.parametrize(("variables", "detail"), REFUSED)
def test_the_service_refuses_and_stores_nothing(pipeline, variables, detail):
    with pytest.raises(InvalidVariables) as refused:
        services.trigger_build(pipeline, variables)
    assert refused.value.detail.startswith(detail)
    assert refused.value.fields["variable"] == detail.split(":")[0].removeprefix("variables.")
    assert not Build.objects.exists()
    assert Pipeline.objects.get(pk=pipeline.pk).last_build_number == 0  # no number used


@pytest.mark.parametrize(("variables", "detail"), REFUSED[:3])
def test_the_api_refuses_with_invalid_variables(pipeline, variables, detail):
    api = client_for("builds.add_build", "builds.view_pipeline")
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/", {"variables": variables}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_VARIABLES"
    assert response.json()["detail"].startswith(detail)
    assert not Build.objects.exists()


def test_the_api_shows_the_parameters(pipeline):
    body = client_for("builds.view_pipeline").get(f"/api/pipelines/{pipeline.pk}/").json()
    assert body["parameters"]["BRANCH"]["pattern"] == "[a-z][a-z0-9/_-]{0,99}"
    assert body["parameters"]["TARGET"]["choices"] == ["staging", "production"]


def test_the_command_refuses_and_accepts(pipeline, capsys):
    with pytest.raises(CommandError, match=r"^INVALID_VARIABLES: variables.TARGET: 'prod' is not"):
        call_command("trigger", "deploy", "--var", "TARGET=prod")
    assert not Build.objects.exists()
    call_command("trigger", "deploy", "--var", "TARGET=staging", "--var", "BRANCH=release/2")
    assert stored(Build.objects.get())["BRANCH"] == ("release/2", "trigger")


def test_the_admin_form_has_a_field_for_each_parameter(admin_client, pipeline):
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    page = admin_client.get(url)
    assert '<select name="parameter_TARGET"' in page.text
    assert '<option value="staging">staging</option>' in page.text
    assert 'name="parameter_BRANCH" value="main"' in page.text
    assert 'name="variables"' not in page.text  # no free-form variables beside parameters
    refused = admin_client.post(url, {"parameter_TARGET": "", "parameter_BRANCH": "main"})
    [message] = [str(m) for m in refused.context["messages"]]
    assert message.startswith("INVALID_VARIABLES: variables.TARGET: required, and not given")
    assert not Build.objects.exists()
    forged = admin_client.post(url, {"parameter_TARGET": "prod"})  # a hand-made POST
    assert "Select a valid choice" in str(forged.context["form"].errors["parameter_TARGET"])
    assert not Build.objects.exists()
    accepted = admin_client.post(url, {"parameter_TARGET": "staging", "parameter_BRANCH": ""})
    assert accepted.status_code == 302
    assert stored(Build.objects.get())["BRANCH"] == ("main", "pipeline")  # empty: the default


PLAIN = (
    "variables: {GREETING: hello}\nstages:\n  - name: s\n    jobs:\n"
    "      - {id: j, runs-on: unit-tests, steps: [{run: 'true'}]}\n"
)
NOT_A_VARIABLE = "variables.NODE_OPTIONS: not a variable of this pipeline"


def test_without_parameters_a_trigger_sets_only_the_pipelines_variables(admin_client):
    pipeline = services.save_pipeline("plain", PLAIN)
    with pytest.raises(InvalidVariables, match=NOT_A_VARIABLE) as refused:
        services.trigger_build(pipeline, {"GREETING": "hi", "NODE_OPTIONS": "--require x"})
    assert refused.value.fields["variable"] == "NODE_OPTIONS"
    api = client_for("builds.add_build", "builds.view_pipeline")
    answer = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/",
        {"variables": {"NODE_OPTIONS": "x"}},
        format="json",
    )
    assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_VARIABLES")
    assert answer.json()["detail"].startswith(NOT_A_VARIABLE)
    with pytest.raises(CommandError, match=f"^INVALID_VARIABLES: {NOT_A_VARIABLE}"):
        call_command("trigger", "plain", "--var", "NODE_OPTIONS=x")
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    page = admin_client.post(url, {"variables": "NODE_OPTIONS=x"})
    assert NOT_A_VARIABLE in page.text
    assert not Build.objects.exists()
    assert Pipeline.objects.get(pk=pipeline.pk).last_build_number == 0

    build = services.trigger_build(pipeline, {"GREETING": "hi"})
    assert stored(build) == {"GREETING": ("hi", "trigger")}


@pytest.mark.parametrize(
    ("parameters", "detail"),
    [
        ("B: {default: Main, pattern: '[a-z]+'}", "parameters.B: default: 'Main' does not match"),
        ("T: {choices: [a, a]}", "parameters.T.choices: a choice is listed twice"),
        ("T: {choices: [a], pattern: x}", "parameters.T: choices or pattern, not both"),
        ("T: {required: true, default: x}", "parameters.T: a required parameter has no default"),
        ("T: {default: b, choices: [a]}", "parameters.T: default: 'b' is not one of its choices"),
        ("T: {pattern: '(a)\\1'}", "parameters.T.pattern: '(a)\\\\1' is not a valid RE2 pattern"),
        ("T: {pattern: '(?=a)'}", "parameters.T.pattern: '(?=a)' is not a valid RE2 pattern"),
        ("T: {colour: red}", "parameters.T.colour: unknown key"),
        ("PATH: {}", "parameters.PATH: reserved"),
        ("CI_X: {}", "parameters.CI_X: reserved"),
        ("1X: {}", "parameters: '1X' is not a valid name"),
    ],
)  # fmt: skip
def test_invalid_parameters_name_the_place(parameters, detail):
    stages = "stages:\n  - name: s\n    jobs:\n      - {id: j, steps: [{run: x}]}\n"
    with pytest.raises(InvalidPipeline) as refused:
        parse_definition(f"parameters:\n  {parameters}\n{stages}")
    assert refused.value.detail.startswith(detail)


def test_a_parameter_is_not_also_a_variable():
    with pytest.raises(InvalidPipeline, match=r"parameters\.A: also in variables"):
        parse_definition(
            "variables: {A: x}\nparameters: {A: {}}\nstages:\n  - name: s\n    jobs:\n"
            "      - {id: j, steps: [{run: x}]}\n"
        )


def test_a_pattern_is_matched_in_linear_time(pipeline):
    """RE2: the classic catastrophic pattern answers at once on a long value."""
    definition = DEFINITION.replace('"[a-z][a-z0-9/_-]{0,99}"', '"(a+)+b"').replace(
        "default: main", "default: ab"
    )
    services.save_pipeline("deploy", definition, pipeline)
    with pytest.raises(InvalidVariables, match="does not match its pattern"):
        services.trigger_build(pipeline, {"TARGET": "staging", "BRANCH": "a" * 30000})


def test_the_example_takes_its_parameters_only():
    example = Path(__file__).resolve().parents[2] / "examples" / "release.yaml"
    pipeline = services.save_pipeline("release", example.read_text())
    with pytest.raises(InvalidVariables, match=r"variables\.VERSION: required"):
        services.trigger_build(pipeline, {})
    with pytest.raises(InvalidVariables, match=r"variables\.CHANNEL: not a parameter"):
        services.trigger_build(pipeline, {"VERSION": "1.4.2", "CHANNEL": "beta"})
    build = services.trigger_build(pipeline, {"VERSION": "1.4.2"})
    assert stored(build)["TARGET"] == ("staging", "pipeline")
