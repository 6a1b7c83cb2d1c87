"""The admin's Trigger page (PipelineAdmin.trigger_view) with Django's test client: what the
browser test does not reach (permissions, refusals, the variable lines). No worker runs these
builds: the test transaction never commits, so their messages are never published."""

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from builds import services
from builds.admin.pipelines import parse_variable_lines
from builds.errors import InvalidVariables
from builds.models import Build
from concurrency.models import ConcurrencyPolicy

DEFINITION = """\
variables:
  GREETING: "<b>hello</b>"
  EXTRA: x
stages:
  - name: s
    jobs:
      - {id: j, runs-on: unit-tests, steps: [{run: echo "$GREETING"}]}
"""


@pytest.fixture
def pipeline(db):
    return services.save_pipeline("demo", DEFINITION)


def trigger_url(pipeline):
    return reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_the_pipeline_page_links_to_the_trigger_page(admin_client, pipeline):
    page = admin_client.get(reverse("admin:builds_pipeline_change", args=(pipeline.pk,)))
    assert f'href="{trigger_url(pipeline)}"' in page.text
    form = admin_client.get(trigger_url(pipeline))
    assert form.status_code == 200
    assert 'name="csrfmiddlewaretoken"' in form.text
    assert "&lt;b&gt;hello&lt;/b&gt;" in form.text  # the defaults, escaped
    assert not Build.objects.exists()  # a GET triggers nothing


def test_trigger_with_variables_redirects_to_the_new_build(admin_client, admin_user, pipeline):
    response = admin_client.post(
        trigger_url(pipeline), {"variables": "GREETING=hi = there \r\n\r\nEXTRA=\r\n"}
    )
    build = Build.objects.get()
    assert response.status_code == 302
    assert response.url == reverse("admin:builds_build_change", args=(build.pk,))
    assert (build.number, build.status, build.triggered_by) == (1, "RUNNING", admin_user)
    assert services.build_variables(build.pk) == {"GREETING": "hi = there ", "EXTRA": ""}
    page = admin_client.get(response.url)
    assert messages_of(page) == ["Build demo #1 triggered: RUNNING"]


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("no equals sign", "variables, line 1: expected KEY=VALUE, got 'no equals sign'"),
        ("A=1\n=2", "variables, line 2: expected KEY=VALUE, got '=2'"),
        ("A=1\nA=2", "variables, line 2: A is given twice"),
        ("PATH=/tmp", "variables.PATH: reserved"),
        ("1A=x", "variables: '1A' is not a valid name"),
    ],
)
def test_invalid_variables_are_a_message_and_trigger_nothing(admin_client, pipeline, text, detail):
    response = admin_client.post(trigger_url(pipeline), {"variables": text})
    assert response.status_code == 200  # the form again, with what was typed
    [message] = messages_of(response)
    assert message.startswith(f"INVALID_VARIABLES: {detail}")
    assert response.context["form"]["variables"].value() == text
    assert not Build.objects.exists()


def test_a_full_queue_is_a_message(admin_client, pipeline):
    policy = ConcurrencyPolicy.objects.create(name="one", max_running=1, queue_length=0)
    services.save_pipeline(pipeline.name, pipeline.definition, pipeline, policy=policy)
    services.trigger_build(pipeline)
    response = admin_client.post(trigger_url(pipeline), {"variables": ""})
    [message] = messages_of(response)
    assert message.startswith("PIPELINE_QUEUE_FULL: ")
    assert Build.objects.count() == 1


def test_a_queued_build_says_why(admin_client, pipeline):
    policy = ConcurrencyPolicy.objects.create(name="one", max_running=1, queue_length=1)
    services.save_pipeline(pipeline.name, pipeline.definition, pipeline, policy=policy)
    services.trigger_build(pipeline)
    response = admin_client.post(trigger_url(pipeline), {"variables": ""}, follow=True)
    [message] = messages_of(response)
    assert message.startswith("Build demo #2 triggered: QUEUED")


def test_triggering_needs_the_add_build_permission(client, pipeline):
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_pipeline", "change_pipeline"])
    )
    client.force_login(user)
    page = client.get(reverse("admin:builds_pipeline_change", args=(pipeline.pk,)))
    assert page.status_code == 200
    assert trigger_url(pipeline) not in page.text
    assert client.get(trigger_url(pipeline)).status_code == 403
    assert client.post(trigger_url(pipeline), {"variables": ""}).status_code == 403
    assert not Build.objects.exists()

    user.user_permissions.add(Permission.objects.get(codename="add_build"))
    user = User.objects.get(pk=user.pk)  # no cached permissions
    client.force_login(user)
    assert client.post(trigger_url(pipeline), {"variables": ""}).status_code == 302
    assert Build.objects.count() == 1


def test_the_trigger_page_of_a_missing_pipeline_is_a_404(admin_client, db):
    assert admin_client.get("/admin/builds/pipeline/999/trigger/").status_code == 404


def test_anonymous_users_are_sent_to_the_login_page(client, pipeline):
    response = client.post(trigger_url(pipeline), {"variables": ""})
    assert response.status_code == 302
    assert response.url.startswith(reverse("admin:login"))
    assert not Build.objects.exists()


def test_the_trigger_form_needs_the_csrf_token(admin_user, pipeline):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(trigger_url(pipeline), {"variables": ""}).status_code == 403
    assert not Build.objects.exists()


def test_parse_variable_lines():
    assert parse_variable_lines("") == {}
    assert parse_variable_lines("A=1\r\n\r\n  B =x=y\n") == {"A": "1", "B": "x=y"}
    with pytest.raises(InvalidVariables):
        parse_variable_lines("A")
