"""The admin: pipelines edited through the services, read-only builds, step logs, agents."""

from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils import timezone

from agents.admin import AgentAdmin
from agents.models import Agent, AgentStatus
from builds import services
from builds.models import Build, JobRun, Pipeline, StepLogChunk, StepRun
from concurrency.models import ConcurrencyPolicy
from tests.support import client_for

DEFINITION = """\
variables:
  GREETING: "<b>hi</b>"
  EXTRA: ""
stages:
  - name: compile-stage
    jobs:
      - id: compile
        runs-on: linux
        steps:
          - name: say-hello
            run: echo "<i>hello</i>"
  - name: test-stage
    jobs:
      - id: unit
        steps:
          - run: make test
"""


@pytest.fixture
def pipeline(db):
    return services.save_pipeline("demo", DEFINITION)


@pytest.fixture
def build(pipeline, admin_user):
    # trigger_build publishes on commit; the test transaction never commits.
    return services.trigger_build(pipeline, {"EXTRA": "from-trigger"}, admin_user)


@pytest.fixture
def step(build):
    return StepRun.objects.get(job__build=build, job__key="compile", index=0)


def log_url(build_id, step_id):
    return reverse("admin:builds_build_step_log", args=(build_id, step_id))


def add_log(step, attempt, text, seq=0):
    StepLogChunk.objects.create(step=step, attempt=attempt, seq=seq, text=text)


# Pipelines ------------------------------------------------------------------------------


def test_pipeline_changelist_and_change_page(admin_client, pipeline, build):
    response = admin_client.get(reverse("admin:builds_pipeline_changelist"))
    assert response.status_code == 200
    assert "demo" in response.text
    assert f"?pipeline__id__exact={pipeline.pk}" in response.text

    response = admin_client.get(reverse("admin:builds_pipeline_change", args=(pipeline.pk,)))
    assert response.status_code == 200
    assert "font-family: monospace" in response.text
    assert "1 builds" in response.text
    # The definition is shown escaped inside the textarea.
    assert "&lt;b&gt;hi&lt;/b&gt;" in response.text


def test_add_pipeline_with_invalid_definition_shows_the_error_and_stores_nothing(admin_client, db):
    definition = DEFINITION.replace("run: make test", "run: make test\n            timeout: 0")
    response = admin_client.post(
        reverse("admin:builds_pipeline_add"), {"name": "broken", "definition": definition}
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["definition"]
    assert errors["definition"][0].startswith(
        "INVALID_PIPELINE: stages[1].jobs[0].steps[0].timeout:"
    )
    assert "INVALID_PIPELINE: stages[1].jobs[0].steps[0].timeout" in response.text
    assert not Pipeline.objects.exists()


def test_add_pipeline_with_invalid_name_shows_the_error(admin_client, db):
    response = admin_client.post(
        reverse("admin:builds_pipeline_add"), {"name": "-bad name", "definition": DEFINITION}
    )
    assert response.status_code == 200
    assert (
        response.context["adminform"].form.errors["name"][0].startswith("INVALID_PIPELINE: name:")
    )
    assert not Pipeline.objects.exists()


def test_add_pipeline_stores_the_parsed_spec(admin_client, db):
    response = admin_client.post(
        reverse("admin:builds_pipeline_add"),
        {"name": "fresh", "definition": DEFINITION.replace("\n", "\r\n")},
    )
    assert response.status_code == 302
    pipeline = Pipeline.objects.get(name="fresh")
    assert pipeline.definition == DEFINITION.strip()  # CRLF from the browser normalized
    assert pipeline.spec["variables"] == {"GREETING": "<b>hi</b>", "EXTRA": ""}
    assert [j["id"] for s in pipeline.spec["stages"] for j in s["jobs"]] == ["compile", "unit"]
    assert pipeline.spec["stages"][1]["jobs"][0]["steps"][0]["name"] == "step 1"


def test_change_pipeline_updates_the_spec(admin_client, pipeline):
    definition = DEFINITION.replace("id: unit", "id: integration")
    response = admin_client.post(
        reverse("admin:builds_pipeline_change", args=(pipeline.pk,)),
        {"name": "demo", "definition": definition},
    )
    assert response.status_code == 302
    pipeline.refresh_from_db()
    assert pipeline.spec["stages"][1]["jobs"][0]["id"] == "integration"


def test_pipeline_name_taken_is_a_form_error(admin_client, pipeline):
    response = admin_client.post(
        reverse("admin:builds_pipeline_add"), {"name": "demo", "definition": DEFINITION}
    )
    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors
    assert Pipeline.objects.count() == 1


def test_the_policy_is_chosen_in_the_admin_and_can_be_removed(admin_client, pipeline):
    policy = ConcurrencyPolicy.objects.create(name="deploys", max_running=1)
    url = reverse("admin:builds_pipeline_change", args=(pipeline.pk,))
    form = {"name": "demo", "definition": DEFINITION}
    assert admin_client.post(url, {**form, "policy": policy.pk}).status_code == 302
    assert Pipeline.objects.get(pk=pipeline.pk).policy == policy
    assert admin_client.post(url, {**form, "policy": ""}).status_code == 302
    assert Pipeline.objects.get(pk=pipeline.pk).policy is None


def test_a_policy_named_in_the_definition_must_exist_and_wins(admin_client, pipeline):
    ConcurrencyPolicy.objects.create(name="deploys", max_running=1)
    other = ConcurrencyPolicy.objects.create(name="other", max_running=1)
    url = reverse("admin:builds_pipeline_change", args=(pipeline.pk,))

    response = admin_client.post(
        url, {"name": "demo", "definition": "concurrency: nosuch\n" + DEFINITION}
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["definition"] == [
        "INVALID_PIPELINE: concurrency: there is no concurrency policy named 'nosuch'"
    ]
    response = admin_client.post(
        url,
        {"name": "demo", "definition": "concurrency: deploys\n" + DEFINITION, "policy": other.pk},
    )
    assert response.status_code == 200
    assert "remove that line" in response.context["adminform"].form.errors["policy"][0]
    assert Pipeline.objects.get(pk=pipeline.pk).policy is None  # nothing was saved


# Builds ---------------------------------------------------------------------------------


def test_build_changelist(admin_client, pipeline, build):
    Build.objects.filter(pk=build.pk).update(
        finished_at=build.started_at + timedelta(hours=1, minutes=2, seconds=5)
    )
    quick = services.trigger_build(pipeline)
    Build.objects.filter(pk=quick.pk).update(finished_at=quick.started_at + timedelta(seconds=7))
    url = reverse("admin:builds_build_changelist")
    response = admin_client.get(url)
    assert response.status_code == 200
    assert "demo" in response.text
    assert "RUNNING" in response.text
    assert "1h 02m 05s" in response.text
    assert ">7s<" in response.text
    # The duration column sorts (on an annotation).
    column = response.context["cl"].list_display.index("duration_display")
    response = admin_client.get(url, {"o": str(column)})
    assert [b.pk for b in response.context["cl"].result_list] == [quick.pk, build.pk]
    response = admin_client.get(url, {"o": f"-{column}"})
    assert [b.pk for b in response.context["cl"].result_list] == [build.pk, quick.pk]


def test_build_page_shows_variables_and_tree_escaped(admin_client, build, step):
    response = admin_client.get(reverse("admin:builds_build_change", args=(build.pk,)))
    assert response.status_code == 200
    text = response.text
    # Variables, with their source; values escaped.
    assert "GREETING" in text
    assert "&lt;b&gt;hi&lt;/b&gt;" in text
    assert "<b>hi</b>" not in text
    assert "EXTRA" in text
    assert "from-trigger" in text
    assert "trigger" in text
    # The tree: stages, jobs, steps (commands escaped), a log link per step.
    for name in ("compile-stage", "test-stage", "compile", "unit", "say-hello", "step 1"):
        assert name in text
    assert "echo &quot;&lt;i&gt;hello&lt;/i&gt;&quot;" in text
    assert "<i>hello</i>" not in text
    assert log_url(build.pk, step.pk) in text
    assert text.count(">log</a>") == 2
    # Read-only history.
    assert 'name="_save"' not in text


def test_builds_cannot_be_added_changed_or_deleted(admin_client, build):
    assert admin_client.get(reverse("admin:builds_build_add")).status_code == 403
    assert (
        admin_client.get(reverse("admin:builds_build_delete", args=(build.pk,))).status_code == 403
    )
    response = admin_client.post(
        reverse("admin:builds_build_change", args=(build.pk,)), {"status": "SUCCEEDED"}
    )
    assert response.status_code == 403
    build.refresh_from_db()
    assert build.status == "RUNNING"


# Step logs ------------------------------------------------------------------------------


def test_log_view_escapes_the_log(admin_client, build, step):
    add_log(step, 1, "before\n<script>alert(1)</script>\n")
    response = admin_client.get(log_url(build.pk, step.pk))
    assert response.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "<script>alert(1)" not in response.text
    assert "say-hello" in response.text


def test_log_view_shows_the_tail_unless_asked_for_all(admin_client, build, step):
    add_log(step, 1, "".join(f"line {n}\n" for n in range(250)))
    response = admin_client.get(log_url(build.pk, step.pk))
    assert response.status_code == 200
    assert "line 249\n" in response.text
    assert "line 50\n" in response.text
    assert "line 49\n" not in response.text
    assert "The first 50 lines are hidden" in response.text
    assert "full=1" in response.text

    response = admin_client.get(log_url(build.pk, step.pk), {"full": "1"})
    assert "line 0\n" in response.text
    assert "line 249\n" in response.text
    assert "lines are hidden" not in response.text


def test_log_view_attempts(admin_client, build, step):
    StepRun.objects.filter(pk=step.pk).update(attempt=2)
    add_log(step, 1, "first attempt output")
    add_log(step, 2, "second attempt output")
    url = log_url(build.pk, step.pk)

    response = admin_client.get(url)
    assert "second attempt output" in response.text
    assert "first attempt output" not in response.text
    assert 'href="?attempt=1"' in response.text

    response = admin_client.get(url, {"attempt": "1"})
    assert "first attempt output" in response.text
    assert "second attempt output" not in response.text

    assert admin_client.get(url, {"attempt": "3"}).status_code == 404
    assert admin_client.get(url, {"attempt": "x"}).status_code == 404
    assert admin_client.get(url, {"attempt": "²"}).status_code == 404


def test_log_view_404_for_a_step_of_another_build(admin_client, pipeline, build, step):
    other = services.trigger_build(pipeline)
    assert admin_client.get(log_url(other.pk, step.pk)).status_code == 404
    assert admin_client.get(log_url(build.pk, step.pk)).status_code == 200


@pytest.fixture
def staff_client(client, db):
    user = User.objects.create_user("operator", password="x", is_staff=True)
    client.force_login(user)
    client.user = user
    return client


def test_log_view_and_build_page_need_view_permission(staff_client, build, step):
    add_log(step, 1, "secret output")
    change_url = reverse("admin:builds_build_change", args=(build.pk,))

    response = staff_client.get(log_url(build.pk, step.pk))
    assert response.status_code == 404  # who sees nothing of the pipeline learns nothing
    assert "secret output" not in response.text
    assert staff_client.get(change_url).status_code == 403

    staff_client.user.user_permissions.add(Permission.objects.get(codename="view_build"))
    response = staff_client.get(log_url(build.pk, step.pk))
    assert response.status_code == 200
    assert "secret output" in response.text
    assert staff_client.get(change_url).status_code == 200


def test_log_view_redirects_anonymous_users_to_login(client, build, step):
    response = client.get(log_url(build.pk, step.pk))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


# Agents ---------------------------------------------------------------------------------


@pytest.fixture
def agent(db):
    return Agent.objects.create(
        name="agent-<1>",
        hostname="node1",
        labels=["linux", "big"],
        capacity=2,
        last_heartbeat=timezone.now() - timedelta(seconds=42),
    )


def test_agent_changelist(admin_client, agent):
    response = admin_client.get(reverse("admin:agents_agent_changelist"))
    assert response.status_code == 200
    assert "agent-&lt;1&gt;" in response.text
    assert "linux, big" in response.text
    assert ">42<" in response.text or ">43<" in response.text


def test_agent_status_is_the_only_editable_field(admin_client, agent, monkeypatch):
    beat = timezone.now()
    get_object = AgentAdmin.get_object

    def heartbeat_after_read(self, *args, **kwargs):
        # The agent heartbeats between the admin reading the row and saving it.
        obj = get_object(self, *args, **kwargs)
        Agent.objects.filter(pk=obj.pk).update(last_heartbeat=beat)
        return obj

    monkeypatch.setattr(AgentAdmin, "get_object", heartbeat_after_read)
    url = reverse("admin:agents_agent_change", args=(agent.pk,))
    response = admin_client.post(
        url, {"status": AgentStatus.DISABLED, "name": "renamed", "capacity": "9"}
    )
    assert response.status_code == 302
    agent.refresh_from_db()
    assert agent.status == AgentStatus.DISABLED
    assert (agent.name, agent.capacity, agent.last_heartbeat) == ("agent-<1>", 2, beat)
    assert admin_client.get(reverse("admin:agents_agent_add")).status_code == 403


# Cancel ----------------------------------------------------------------------------------


def cancel_url(build_id):
    return reverse("admin:builds_build_cancel", args=(build_id,))


def test_build_page_offers_cancel_while_the_build_runs(admin_client, build):
    page = admin_client.get(reverse("admin:builds_build_change", args=(build.pk,)))
    assert cancel_url(build.pk).encode() in page.content
    response = admin_client.post(cancel_url(build.pk), follow=True)
    assert response.status_code == 200
    assert f"Build {build}: CANCELLING" in response.content.decode()
    assert Build.objects.get(pk=build.pk).status == "CANCELLING"
    page = admin_client.get(reverse("admin:builds_build_change", args=(build.pk,)))
    assert cancel_url(build.pk).encode() not in page.content


def test_cancel_is_post_only_and_needs_the_permission(client, admin_client, build):
    assert admin_client.get(cancel_url(build.pk)).status_code == 405
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_build"))
    client.force_login(viewer)
    page = client.get(reverse("admin:builds_build_change", args=(build.pk,)))
    assert page.status_code == 200
    assert cancel_url(build.pk).encode() not in page.content
    assert client.post(cancel_url(build.pk)).status_code == 403
    assert Build.objects.get(pk=build.pk).status == "RUNNING"


def test_cancel_action_reports_each_build(admin_client, pipeline, build):
    done = services.trigger_build(pipeline)
    Build.objects.filter(pk=done.pk).update(status="SUCCEEDED")
    response = admin_client.post(
        reverse("admin:builds_build_changelist"),
        {"action": "cancel_builds", "_selected_action": [build.pk, done.pk]},
        follow=True,
    )
    text = response.content.decode()
    assert f"Build {build}: CANCELLING" in text
    assert "BUILD_ALREADY_FINISHED" in text
    assert Build.objects.get(pk=build.pk).status == "CANCELLING"
    assert Build.objects.get(pk=done.pk).status == "SUCCEEDED"


# Step retry ------------------------------------------------------------------------------


class _Forms(HTMLParser):
    """The page's forms and the buttons that submit a form by its id (form="...")."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.nested = False
        self.actions = []  # every form's action
        self.forms = {}  # id -> action, of the forms that have an id
        self.buttons = []  # form ids named by buttons' form attribute

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.depth += 1
            self.nested |= self.depth > 1
            self.actions.append(attrs.get("action"))
            if "id" in attrs:
                self.forms[attrs["id"]] = attrs.get("action")
        elif tag == "button" and "form" in attrs:
            self.buttons.append(attrs["form"])

    def handle_endtag(self, tag):
        if tag == "form":
            self.depth -= 1


def parse_forms(html: str) -> _Forms:
    """Parse a page, checking that no form is nested in another (invalid HTML)."""
    parser = _Forms()
    parser.feed(html)
    assert not parser.nested, "a form is nested in another"
    assert parser.depth == 0
    return parser


def retry_url(build_id, step_id):
    return reverse("admin:builds_build_step_retry", args=(build_id, step_id))


def fail_step(build, step, build_status="FAILED"):
    now = timezone.now()
    StepRun.objects.filter(pk=step.pk).update(
        status="FAILED", exit_code=2, started_at=now - timedelta(seconds=5), finished_at=now
    )
    JobRun.objects.filter(pk=step.job_id).update(status="FAILED", finished_at=now)
    StepRun.objects.filter(job_id=step.job_id).exclude(pk=step.pk).update(status="SKIPPED")
    Build.objects.filter(pk=build.pk).update(status=build_status, finished_at=now)


def test_build_page_offers_retry_for_a_failed_step(admin_client, build, step):
    fail_step(build, step)
    response = admin_client.get(reverse("admin:builds_build_change", args=(build.pk,)))
    assert response.status_code == 200
    forms = parse_forms(response.text)
    # The button in the tree submits a form of its own, outside the change form.
    assert forms.buttons == [f"retry-step-{step.pk}"]
    assert forms.forms[f"retry-step-{step.pk}"] == retry_url(build.pk, step.pk)
    assert response.text.count(">Retry</button>") == 1


def test_retry_button_follows_the_retry_rule(admin_client, build, step):
    change_url = reverse("admin:builds_build_change", args=(build.pk,))
    # A failed step of a job still running: not yet.
    StepRun.objects.filter(pk=step.pk).update(status="FAILED")
    JobRun.objects.filter(pk=step.job_id).update(status="RUNNING")
    assert retry_url(build.pk, step.pk) not in admin_client.get(change_url).text
    # The job ended and the build still runs: yes.
    JobRun.objects.filter(pk=step.job_id).update(status="FAILED")
    assert retry_url(build.pk, step.pk) in admin_client.get(change_url).text
    # While the build is being cancelled: no.
    Build.objects.filter(pk=build.pk).update(status="CANCELLING")
    assert retry_url(build.pk, step.pk) not in admin_client.get(change_url).text
    # A step that succeeded: no.
    Build.objects.filter(pk=build.pk).update(status="FAILED")
    StepRun.objects.filter(pk=step.pk).update(status="SUCCEEDED")
    assert retry_url(build.pk, step.pk) not in admin_client.get(change_url).text
    # Timed out or cancelled: yes.
    for status in ("TIMED_OUT", "CANCELED"):
        StepRun.objects.filter(pk=step.pk).update(status=status)
        assert retry_url(build.pk, step.pk) in admin_client.get(change_url).text


def test_retry_step_from_the_build_page(admin_client, build, step):
    fail_step(build, step)
    response = admin_client.post(retry_url(build.pk, step.pk), follow=True)
    assert response.redirect_chain == [
        (reverse("admin:builds_build_change", args=(build.pk,)), 302)
    ]
    assert f"Build {build}: step &#x27;say-hello&#x27; retried, attempt 2" in response.text
    step.refresh_from_db()
    assert (step.status, step.attempt, step.exit_code) == ("PENDING", 2, None)
    assert Build.objects.get(pk=build.pk).status in ("RUNNING", "QUEUED")
    # Nothing left to retry.
    assert retry_url(build.pk, step.pk) not in response.text


def test_retry_step_reports_the_service_error(admin_client, pipeline, build, step):
    fail_step(build, step)
    StepRun.objects.filter(pk=step.pk).update(status="SUCCEEDED")  # meanwhile
    response = admin_client.post(retry_url(build.pk, step.pk), follow=True)
    assert f"Build {build}: STEP_NOT_RETRYABLE: step &#x27;say-hello&#x27; is SUCCEEDED" in (
        response.text
    )
    assert StepRun.objects.get(pk=step.pk).attempt == 1

    other = services.trigger_build(pipeline)
    response = admin_client.post(retry_url(other.pk, step.pk), follow=True)
    assert f"Build {other}: STEP_NOT_FOUND: build {other.pk} has no step {step.pk}" in (
        response.text
    )
    assert admin_client.post(retry_url(0, step.pk)).status_code == 404


def test_retry_step_is_post_only_and_needs_the_permission(client, admin_client, build, step):
    fail_step(build, step)
    assert admin_client.get(retry_url(build.pk, step.pk)).status_code == 405
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_build"))
    client.force_login(viewer)
    page = client.get(reverse("admin:builds_build_change", args=(build.pk,)))
    assert page.status_code == 200
    assert retry_url(build.pk, step.pk) not in page.text
    assert ">Retry</button>" not in page.text
    assert client.post(retry_url(build.pk, step.pk)).status_code == 403
    step.refresh_from_db()
    assert (step.status, step.attempt) == ("FAILED", 1)

    viewer.user_permissions.add(Permission.objects.get(codename="retry_build"))
    viewer = User.objects.get(pk=viewer.pk)  # a fresh permission cache
    client.force_login(viewer)
    assert (
        retry_url(build.pk, step.pk)
        in client.get(reverse("admin:builds_build_change", args=(build.pk,))).text
    )
    assert client.post(retry_url(build.pk, step.pk)).status_code == 302
    assert StepRun.objects.get(pk=step.pk).attempt == 2


def test_build_page_shows_what_the_definition_set_for_jobs_and_steps(admin_client):
    pipeline = services.save_pipeline(
        "settings",
        "stages:\n  - name: s\n    jobs:\n      - id: j\n        timeout: 30\n        steps:\n"
        "          - run: 'true'\n            timeout: 20\n"
        "            retry: {max: 3, on: [failure], on-exit-codes: [75], backoff: 5}\n"
        "            max-memory: 64M\n            max-processes: 50\n",
    )
    build = services.trigger_build(pipeline)
    page = admin_client.get(reverse("admin:builds_build_change", args=(build.pk,))).text
    assert "(runs-on default, timeout 30 s)" in page
    assert (
        "timeout 20 s, retry 3 on failure (exit codes 75), backoff 5 s, max-processes 50,"
        " max-memory 64.0\xa0MB"
    ) in page
    api = client_for("builds.view_build").get(f"/api/builds/{build.pk}/").json()
    job = api["stages"][0]["jobs"][0]
    assert job["timeout"] == 30
    assert job["steps"][0]["retry_rule"] == {"on": ["failure"], "on_exit_codes": [75], "backoff": 5}
    assert (job["steps"][0]["max_memory"], job["steps"][0]["max_processes"]) == (64 * 1024**2, 50)
