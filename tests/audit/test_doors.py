"""The audit trail through the real doors: the API with a real token, the admin with a
session, the commands. Each state change a person makes is recorded once, with who, the
token's name, the address, the target and names (never values); a refused request, a
rolled-back change and the system's own work record nothing."""

import io

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

import audit
from agents.models import Agent
from audit.models import AuditEvent
from audit.trail import token_name
from builds import services
from builds.models import Build, JobRun, StepRun
from concurrency.models import ConcurrencyPolicy
from forge.models import Schedule
from tests.support import PARALLEL, client_for, fail_fast_job, one_step
from tokens.models import ApiToken
from vault.models import SecretScope

pytestmark = pytest.mark.django_db

DEFINITION = one_step("true", runs_on="unit-tests", variables="GREETING TOKEN")


def person(*perms):
    """An API client with a real token, and its user."""
    client = client_for(*perms)
    return client, User.objects.latest("pk")


def the_event(**match) -> AuditEvent:
    """The one event of the trail, which must match."""
    events = list(AuditEvent.objects.all())
    assert len(events) == 1, [str(e) for e in events]
    for name, value in match.items():
        assert getattr(events[0], name) == value, (name, getattr(events[0], name))
    return events[0]


def failed_build(pipeline) -> Build:
    build = services.trigger_build(pipeline)
    now = timezone.now()
    JobRun.objects.filter(build=build).update(status="FAILED", started_at=now)
    StepRun.objects.filter(job__build=build).update(status="FAILED", started_at=now)
    assert services.advance_build(build.pk) == "FAILED"
    return build


@pytest.fixture
def pipeline():
    return services.save_pipeline("web", DEFINITION)  # nobody acts: not recorded


def test_the_systems_own_changes_record_nothing(pipeline):
    build = services.trigger_build(pipeline, {"GREETING": "hi"})
    services.request_cancel(build.pk)
    assert AuditEvent.objects.count() == 0


# --- the API, with a token ------------------------------------------------------------------


def test_a_trigger_is_recorded_once_with_names_never_values(pipeline):
    api, user = person("builds.add_build")
    response = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/",
        {"variables": {"TOKEN": "hunter2-value", "GREETING": "hi"}},
        format="json",
        headers={"Idempotency-Key": "k1"},
    )
    assert response.status_code == 201
    build = Build.objects.get()
    event = the_event(
        action="build.trigger",
        actor=user,
        username=user.username,
        token_name="test-0",  # tests.support.api_token's name for a user's first token
        via="api",
        address="127.0.0.1",
        target_type="builds.build",
        target_id=str(build.pk),
        target_label="web #1",
    )
    assert event.details == {"variables": ["GREETING", "TOKEN"], "priority": 0}
    # The same trigger again is the first one's build: no change, no second event.
    again = api.post(
        f"/api/pipelines/{pipeline.pk}/builds/",
        {"variables": {"TOKEN": "hunter2-value", "GREETING": "hi"}},
        format="json",
        headers={"Idempotency-Key": "k1"},
    )
    assert again.status_code == 200
    assert AuditEvent.objects.count() == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM audit_auditevent")
        assert "hunter2" not in repr(cursor.fetchall())


def test_a_trigger_cancelling_others_by_its_policy_is_one_event():
    policy = ConcurrencyPolicy.objects.create(name="one", max_running=1, cancel_in_progress=True)
    pipeline = services.save_pipeline("web", DEFINITION, policy=policy)
    earlier = services.trigger_build(pipeline)
    api, _ = person("builds.add_build")
    assert api.post(f"/api/pipelines/{pipeline.pk}/builds/", {}, format="json").status_code == 201
    earlier.refresh_from_db()
    assert earlier.status == "CANCELLING"  # the policy's doing: told by its reason
    the_event(action="build.trigger", target_label="web #2")


def test_cancel_then_forced_then_nothing(pipeline):
    build = services.trigger_build(pipeline)
    api, user = person("builds.cancel_build", "builds.view_build")
    for _ in range(3):  # the third changes nothing
        assert api.post(f"/api/builds/{build.pk}/cancel/").status_code == 202
    events = list(AuditEvent.objects.order_by("id").values_list("action", "details", "actor"))
    assert events == [
        ("build.cancel", {"forced": False}, user.pk),
        ("build.cancel", {"forced": True}, user.pk),
    ]


def test_step_retry_and_build_retry():
    api, user = person("builds.retry_build", "builds.view_build")
    running = services.trigger_build(services.save_pipeline("par", PARALLEL))
    step = fail_fast_job(running)
    assert api.post(f"/api/builds/{running.pk}/steps/{step.pk}/retry/").status_code == 202
    the_event(action="step.retry", target_id=str(step.pk), actor=user)
    AuditEvent.objects.all().delete()
    failed = failed_build(services.save_pipeline("one", DEFINITION))
    response = api.post(f"/api/builds/{failed.pk}/retry/", {"failed_only": True}, format="json")
    assert response.status_code == 202
    event = the_event(action="build.retry", target_id=str(failed.pk), actor=user)
    assert event.details == {"failed_only": True, "attempt": 2}


def test_pipeline_create_and_edit_name_the_changed_fields():
    api, user = person("builds.add_pipeline", "builds.change_pipeline", "builds.view_pipeline")
    response = api.post("/api/pipelines/", {"name": "web", "definition": DEFINITION}, format="json")
    assert response.status_code == 201
    created = the_event(action="pipeline.create", target_label="web", actor=user)
    path = f"/api/pipelines/{response.json()['id']}/"
    changed = DEFINITION.replace("true", "false")
    for _ in range(2):  # the second PUT changes nothing: no event
        assert (
            api.put(path, {"name": "web2", "definition": changed}, format="json").status_code == 200
        )
    edit = AuditEvent.objects.exclude(pk=created.pk).get()
    assert (edit.action, edit.details, edit.target_label) == (
        "pipeline.edit",
        {"changed": ["name", "definition"]},
        "web2",
    )


def test_a_secret_set_records_its_name_never_its_value(pipeline):
    perms = ["builds.view_pipeline", "vault.add_secret", "vault.change_secret"]
    api, _ = person(*perms, "vault.delete_secret")
    path = f"/api/pipelines/{pipeline.pk}/secrets/DEPLOY_KEY/"
    assert api.put(path, {"value": "s3cr3t-Value-42"}, format="json").status_code == 204
    assert api.put(path, {"value": "s3cr3t-Value-43"}, format="json").status_code == 204
    assert api.delete(path).status_code == 204
    events = list(AuditEvent.objects.order_by("id"))
    assert [(e.action, e.details, e.target_label) for e in events] == [
        ("secret.set", {"replaced": False}, "DEPLOY_KEY (pipeline web)"),
        ("secret.set", {"replaced": True}, "DEPLOY_KEY (pipeline web)"),
        ("secret.delete", {}, "DEPLOY_KEY (pipeline web)"),
    ]
    assert {e.target_id for e in events} != {""}
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM audit_auditevent")
        assert "s3cr3t" not in repr(cursor.fetchall())


def test_repository_set_rotate_delete(pipeline):
    api, _ = person("builds.view_pipeline", "builds.change_pipeline")
    path = f"/api/pipelines/{pipeline.pk}/repository/"
    body = {"forge": "github", "clone_url": "https://forge.example/o/r.git"}
    assert api.put(path, body, format="json").status_code == 201
    body["default_branch"] = "trunk"
    assert api.put(path, body, format="json").status_code == 200
    assert api.post(path + "rotate-secret/").status_code == 200
    assert api.delete(path).status_code == 204
    assert list(AuditEvent.objects.order_by("id").values_list("action", "details")) == [
        ("repository.create", {}),
        ("repository.edit", {"changed": ["default_branch"]}),
        ("repository.rotate_secret", {}),
        ("repository.delete", {}),
    ]
    with connection.cursor() as cursor:  # nor the webhook secret the first PUT answered
        cursor.execute("SELECT details::text, target_label FROM audit_auditevent")
        assert "webhook" not in repr(cursor.fetchall())


def test_refused_requests_record_nothing(pipeline):
    viewer, _ = person("builds.view_build")
    build = services.trigger_build(pipeline)
    assert viewer.post(f"/api/builds/{build.pk}/cancel/").status_code == 403
    canceller, _ = person("builds.cancel_build", "builds.view_build")
    finished = failed_build(pipeline)
    assert canceller.post(f"/api/builds/{finished.pk}/cancel/").status_code == 409
    trigger, _ = person("builds.add_build")
    path = f"/api/pipelines/{pipeline.pk}/builds/"
    assert trigger.post(path, {"variables": {"NOPE": "x"}}, format="json").status_code == 400
    assert AuditEvent.objects.count() == 0


def trigger_then_fail(pipeline):
    with transaction.atomic():
        services.trigger_build(pipeline)
        assert AuditEvent.objects.count() == 1  # written in the same transaction
        raise RuntimeError("the caller's transaction fails after the service")


def test_a_rolled_back_change_leaves_no_event(pipeline):
    user = User.objects.create_user("alice")
    with audit.acting_as(user, via="cli"), pytest.raises(RuntimeError, match="fails after"):
        trigger_then_fail(pipeline)
    assert AuditEvent.objects.count() == 0
    assert Build.objects.count() == 0


def test_the_address_behind_a_trusted_proxy(pipeline, settings):
    api, _ = person("builds.add_build")
    path = f"/api/pipelines/{pipeline.pk}/builds/"
    spoofed = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"}  # the client wrote the first
    assert api.post(path, {}, format="json", headers=spoofed).status_code == 201
    settings.TRUSTED_PROXY_COUNT = 1
    assert api.post(path, {}, format="json", headers=spoofed).status_code == 201
    addresses = list(AuditEvent.objects.order_by("id").values_list("address", flat=True))
    assert addresses == ["127.0.0.1", "203.0.113.7"]


def test_a_tokens_name_never_its_key():
    class Named:
        name = "deploy-bot"

    class Unnamed:
        key = "0123456789abcdef"

        def __str__(self):
            return self.key

    assert (token_name(Named()), token_name(Unnamed()), token_name(None)) == (
        "deploy-bot",
        "token",
        "",
    )


# --- the admin, with a session --------------------------------------------------------------


@pytest.fixture
def admin_client():
    user = User.objects.create_superuser("root-admin", password=None)
    client = Client(REMOTE_ADDR="192.0.2.10")
    client.force_login(user)
    client.user = user
    return client


def test_admin_trigger(admin_client, pipeline):
    response = admin_client.post(
        f"/admin/builds/pipeline/{pipeline.pk}/trigger/",
        {"variables": "GREETING=hi", "idempotency_key": "k"},
    )
    assert response.status_code == 302
    the_event(
        action="build.trigger",
        actor=admin_client.user,
        token_name="",
        via="admin",
        address="192.0.2.10",
    )


def test_admin_pipeline_delete(admin_client, pipeline):
    response = admin_client.post(f"/admin/builds/pipeline/{pipeline.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    the_event(action="pipeline.delete", target_id=str(pipeline.pk), target_label="web")


POLICY = {"name": "deploys", "group_key": "${pipeline_id}", "max_running": "1"} | {
    "queue_length": "5", "queue_timeout": "3600", "on_queue_full": "reject"
}  # fmt: skip


def test_admin_policy_create_edit_delete(admin_client):
    base = "/admin/concurrency/concurrencypolicy/"
    assert admin_client.post(base + "add/", POLICY).status_code == 302
    policy = ConcurrencyPolicy.objects.get()
    change = base + f"{policy.pk}/change/"
    assert admin_client.post(change, POLICY | {"max_running": "3"}).status_code == 302
    assert admin_client.post(change, POLICY | {"max_running": "3"}).status_code == 302  # same
    assert admin_client.post(base + f"{policy.pk}/delete/", {"post": "yes"}).status_code == 302
    assert list(AuditEvent.objects.order_by("id").values_list("action", "details")) == [
        ("policy.create", {}),
        ("policy.edit", {"changed": ["max_running"]}),
        ("policy.delete", {}),
    ]
    # A refused edit (the model's validation) records nothing.
    assert admin_client.post(base + "add/", POLICY | {"max_running": "-1"}).status_code == 200
    assert AuditEvent.objects.count() == 3


def test_admin_agent_drain_and_undrain(admin_client):
    agent = Agent.objects.create(name="a1", labels=["x"])
    for door in ("drain", "drain", "undrain"):  # draining a drained agent changes nothing
        response = admin_client.post(f"/admin/agents/agent/{agent.pk}/{door}/")
        assert response.status_code == 302
    assert list(AuditEvent.objects.order_by("id").values_list("action", "target_label")) == [
        ("agent.drain", "a1"),
        ("agent.undrain", "a1"),
    ]


def test_admin_schedule_create_and_delete(admin_client, pipeline):
    form = {"pipeline": pipeline.pk, "cron": "0 3 * * *", "timezone": "UTC", "branch": ""}
    form |= {"variables": "{}", "enabled": "on"}
    assert admin_client.post("/admin/forge/schedule/add/", form).status_code == 302
    schedule = Schedule.objects.get()
    path = f"/admin/forge/schedule/{schedule.pk}/delete/"
    assert admin_client.post(path, {"post": "yes"}).status_code == 302
    assert list(AuditEvent.objects.order_by("id").values_list("action", flat=True)) == [
        "schedule.create",
        "schedule.delete",
    ]


def test_admin_scope_grants_are_edits(admin_client, pipeline):
    other = services.save_pipeline("api", DEFINITION)
    base = "/admin/vault/secretscope/"
    form = {"name": "deploy", "description": "", "pipelines": [pipeline.pk]}
    assert admin_client.post(base + "add/", form).status_code == 302
    scope = SecretScope.objects.get()
    form["pipelines"] = [pipeline.pk, other.pk]  # the other pipeline may use its secrets now
    assert admin_client.post(base + f"{scope.pk}/change/", form).status_code == 302
    assert list(AuditEvent.objects.order_by("id").values_list("action", "details")) == [
        ("scope.create", {}),
        ("scope.edit", {"changed": ["pipelines"]}),
    ]


# --- the commands: the operator -------------------------------------------------------------


def test_a_command_acts_as_the_operator(pipeline):
    build = services.trigger_build(pipeline)
    call_command("cancel", str(build.pk), stdout=io.StringIO())
    event = the_event(action="build.cancel", actor=None, via="cli", token_name="", address=None)
    assert event.username.startswith("os:")


def test_tokens_made_rotated_and_revoked_are_recorded_by_name_never_value():
    api, user = person()
    made = api.post("/api/tokens/", {"name": "deploy", "actions": ["trigger"]}, format="json")
    assert made.status_code == 201, made.content
    first = made.json()
    rotated = api.post(f"/api/tokens/{first['id']}/rotate/", {}, format="json")
    assert rotated.status_code == 201, rotated.content
    assert api.delete(f"/api/tokens/{rotated.json()['id']}/").status_code == 204
    events = list(AuditEvent.objects.order_by("id"))
    assert [(e.action, e.target_label, e.target_id) for e in events] == [
        ("token.create", "deploy", str(first["id"])),
        ("token.revoke", "deploy", str(first["id"])),
        ("token.create", "deploy", str(rotated.json()["id"])),
        ("token.revoke", "deploy", str(rotated.json()["id"])),
    ]
    assert {(e.actor, e.via, e.token_name) for e in events} == {(user, "api", "test-0")}
    assert events[0].details == {
        "owner": user.username,
        "actions": ["read", "trigger"],
        "pipelines": [],
        "expires": ApiToken.objects.get(pk=first["id"]).expiry.isoformat(),
        "kind": "personal",
    }
    with connection.cursor() as cursor:  # neither value, nor their prefixes
        cursor.execute("SELECT details::text, target_label FROM audit_auditevent")
        trail = repr(cursor.fetchall())
    for value in (first["token"], rotated.json()["token"]):
        assert value[:8] not in trail


def test_createtoken_is_the_operators(pipeline):
    User.objects.create_user("ci-bot")
    call_command(
        "createtoken",
        "--user",
        "ci-bot",
        "--name",
        "bot",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    event = the_event(action="token.create", actor=None, via="cli", target_label="bot")
    assert event.username.startswith("os:")
    assert event.details["owner"] == "ci-bot"
