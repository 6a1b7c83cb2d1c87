"""Secrets: set, replaced and deleted through the API, `manage.py secret` and the admin;
never readable back at any door; encrypted at rest under keys of their own, rotatable; named
by jobs only as the pipeline has them; every change on the trail, with names only."""

import io
import json

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet
from django.contrib.admin.models import LogEntry
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse

from agents.services import register_agent
from audit.models import AuditEvent
from builds import services as builds
from builds.errors import InvalidPipeline
from builds.models import JobRun, Pipeline
from tests.support import client_for, one_step
from vault import crypto, sealing, services, tokens
from vault.errors import InvalidSecret, SecretNotFound
from vault.models import Secret, SecretEvent, SecretScope

pytestmark = pytest.mark.django_db

VALUE = "s3cr3t-Valu3-7f1c"
NAMING = one_step("true").replace("{id: j,", "{id: j, secrets: [DEPLOY_TOKEN],")


@pytest.fixture(autouse=True)
def key(settings):
    settings.SECRETS_KEYS = [Fernet.generate_key().decode()]
    return settings.SECRETS_KEYS[0]


@pytest.fixture
def pipeline():
    return builds.save_pipeline("web", one_step("true"))


def value_of(owner, name: str) -> str:
    """What is stored, decrypted here (values_for would record a delivery)."""
    return crypto.decrypt(services.secrets_of(owner).get(name=name).ciphertext)


def url(pipeline, name=""):
    return f"/api/pipelines/{pipeline.pk}/secrets/" + (f"{name}/" if name else "")


def stored_bytes() -> bytes:
    """Every byte of the tables a value could land in, as PostgreSQL holds them."""
    with connection.cursor() as cursor:
        dumps = []
        for table in ("vault_secret", "vault_secretevent", "django_admin_log"):
            cursor.execute(f"SELECT t::text FROM {table} t")
            dumps += [row[0] for row in cursor.fetchall()]
        cursor.execute("SELECT ciphertext FROM vault_secret")
        dumps += [bytes(row[0]).decode("latin-1") for row in cursor.fetchall()]
    return "\n".join(dumps).encode()


def test_the_api_sets_replaces_lists_and_deletes_and_never_answers_a_value(pipeline):
    api = client_for(
        "builds.view_pipeline", "vault.view_secret", "vault.add_secret", "vault.change_secret",
        "vault.delete_secret",
    )  # fmt: skip
    put = api.put(url(pipeline, "DEPLOY_TOKEN"), {"value": VALUE}, format="json")
    assert (put.status_code, put.content) == (204, b"")
    again = api.put(url(pipeline, "DEPLOY_TOKEN"), {"value": VALUE + "2"}, format="json")
    assert again.status_code == 204
    listed = api.get(url(pipeline))
    assert listed.status_code == 200
    assert [s["name"] for s in listed.json()] == ["DEPLOY_TOKEN"]
    assert VALUE not in listed.text
    for path in (url(pipeline, "DEPLOY_TOKEN"), f"/api/pipelines/{pipeline.pk}/"):
        assert VALUE not in api.get(path).text  # no door reads it back
    assert services.values_for(pipeline, ["DEPLOY_TOKEN"]) == {"DEPLOY_TOKEN": VALUE + "2"}
    assert VALUE.encode() not in stored_bytes()  # encrypted at rest, and nowhere else
    assert api.delete(url(pipeline, "DEPLOY_TOKEN")).status_code == 204
    gone = api.delete(url(pipeline, "DEPLOY_TOKEN"))
    assert (gone.status_code, gone.json()["code"]) == (404, "SECRET_NOT_FOUND")
    trail = SecretEvent.objects.order_by("id").values_list("action", "name", "source")
    assert list(trail) == [
        ("SET", "DEPLOY_TOKEN", "api"),
        ("REPLACED", "DEPLOY_TOKEN", "api"),
        ("DELIVERED", "DEPLOY_TOKEN", "job"),
        ("DELETED", "DEPLOY_TOKEN", "api"),
    ]


@pytest.mark.parametrize(
    ("name", "value", "detail"),
    [
        ("TOKEN", "abc", "shorter than 4 characters"),
        ("TOKEN", "  ab  ", "shorter than 4 characters"),
        ("TOKEN", "x" * (32 * 1024 + 1), "over 32768 bytes"),
        ("1TOKEN", VALUE, "not a valid secret name"),
        ("PATH", VALUE, "PATH: reserved"),
        ("CI_TOKEN", VALUE, "reserved"),
    ],
)
def test_bad_secrets_are_refused_and_nothing_is_stored(pipeline, name, value, detail):
    api = client_for("builds.view_pipeline", "vault.add_secret", "vault.change_secret")
    answer = api.put(url(pipeline, name), {"value": value}, format="json")
    assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_SECRET")
    assert detail in answer.json()["detail"]
    assert not Secret.objects.exists()
    assert not SecretEvent.objects.exists()


def test_a_value_that_is_not_text_is_refused_at_every_door(pipeline):
    with pytest.raises(InvalidSecret, match="TOKEN: the value is not valid Unicode text"):
        services.set_secret(pipeline, "TOKEN", "abcd\udc80")
    api = client_for("builds.view_pipeline", "vault.add_secret", "vault.change_secret")
    body = b'{"value": "abcd\\udc80"}'  # a lone surrogate, escaped in JSON
    answer = api.put(url(pipeline, "TOKEN"), body, content_type="application/json")
    assert answer.status_code == 400  # never a 500 (that would show the value)
    assert not Secret.objects.exists()


def test_each_action_needs_its_permission(pipeline):
    services.set_secret(pipeline, "TOKEN", VALUE)
    reader = client_for("builds.view_pipeline", "vault.view_secret")
    assert reader.get(url(pipeline)).status_code == 200
    assert reader.put(url(pipeline, "TOKEN"), {"value": "other"}, format="json").status_code == 403
    assert reader.delete(url(pipeline, "TOKEN")).status_code == 403
    assert client_for("builds.view_pipeline").get(url(pipeline)).status_code == 403
    assert services.values_for(pipeline, ["TOKEN"]) == {"TOKEN": VALUE}


def test_the_key_is_its_own_and_rotates(pipeline, key, settings):
    services.set_secret(pipeline, "TOKEN", VALUE)
    token = bytes(Secret.objects.get().ciphertext)
    assert Fernet(key).decrypt(token).decode() == VALUE  # the secrets key, not SECRET_KEY
    newer = Fernet.generate_key().decode()
    settings.SECRETS_KEYS = [newer, key]  # the new key in front; the old one still reads
    assert services.values_for(pipeline, ["TOKEN"]) == {"TOKEN": VALUE}
    out = io.StringIO()
    call_command("secret", "rotate", stdout=out)
    assert out.getvalue().strip() == "1 secrets re-encrypted under the first key"
    rotated = AuditEvent.objects.get()  # the operator's, by name
    assert (rotated.action, rotated.target_label, rotated.via) == (
        "secret.rotate",
        "TOKEN (pipeline web)",
        "cli",
    )
    settings.SECRETS_KEYS = [newer]  # the old key dropped
    assert services.values_for(pipeline, ["TOKEN"]) == {"TOKEN": VALUE}


def test_the_command_reads_the_value_from_stdin(pipeline, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(VALUE + "\n"))
    out = io.StringIO()
    call_command("secret", "set", "web", "TOKEN", stdout=out)
    assert out.getvalue().strip() == "secret TOKEN set"
    assert services.values_for(pipeline, ["TOKEN"]) == {"TOKEN": VALUE}  # without echo's \n
    out = io.StringIO()
    call_command("secret", "list", "web", stdout=out)
    assert out.getvalue().split() == ["TOKEN"]
    monkeypatch.setattr("sys.stdin", io.StringIO("ab"))
    with pytest.raises(CommandError, match=r"^INVALID_SECRET: TOKEN: the value is shorter"):
        call_command("secret", "set", "web", "TOKEN")
    call_command("secret", "delete", "web", "TOKEN", stdout=io.StringIO())
    with pytest.raises(CommandError, match=r"^SECRET_NOT_FOUND: pipeline web has no secret"):
        call_command("secret", "delete", "web", "TOKEN")
    with pytest.raises(CommandError, match="no pipeline named 'nope'"):
        call_command("secret", "list", "nope")


def test_the_admin_sets_a_value_it_never_shows(admin_client, pipeline):
    add = admin_client.post(
        reverse("admin:vault_secret_add"),
        {"pipeline": pipeline.pk, "name": "TOKEN", "value": VALUE},
    )
    assert add.status_code == 302, add.content
    secret = Secret.objects.get()
    page = admin_client.get(reverse("admin:vault_secret_change", args=(secret.pk,)))
    assert page.status_code == 200
    assert VALUE not in page.text
    assert 'type="password"' in page.text
    kept = admin_client.post(reverse("admin:vault_secret_change", args=(secret.pk,)), {"value": ""})
    assert kept.status_code == 302
    assert value_of(pipeline, "TOKEN") == VALUE  # empty: unchanged
    short = admin_client.post(
        reverse("admin:vault_secret_change", args=(secret.pk,)), {"value": "ab"}
    )
    assert "INVALID_SECRET" in short.text
    history = admin_client.get(reverse("admin:vault_secret_history", args=(secret.pk,)))
    assert VALUE not in history.text
    assert VALUE not in " ".join(LogEntry.objects.values_list("change_message", flat=True))
    listed = admin_client.get(reverse("admin:vault_secret_changelist"))
    assert "TOKEN" in listed.text
    assert VALUE not in listed.text
    assert VALUE.encode() not in stored_bytes()
    admin_client.post(reverse("admin:vault_secret_delete", args=(secret.pk,)), {"post": "yes"})
    assert not Secret.objects.exists()
    assert list(SecretEvent.objects.order_by("id").values_list("action", "source")) == [
        ("SET", "admin"),
        ("DELETED", "admin"),
    ]


def test_a_job_names_only_secrets_its_pipeline_has(pipeline):
    with pytest.raises(InvalidPipeline) as refused:
        builds.save_pipeline("web", NAMING, pipeline)
    assert refused.value.detail.startswith(
        "stages[0].jobs[0].secrets[0]: no secret 'DEPLOY_TOKEN' for this pipeline (its secrets:"
        " none;"
    )
    assert Pipeline.objects.get().spec["stages"][0]["jobs"][0]["secrets"] == []  # unchanged
    services.set_secret(pipeline, "OTHER", VALUE)
    with pytest.raises(InvalidPipeline, match=r"\(its secrets: OTHER;"):
        builds.save_pipeline("web", NAMING, pipeline)
    shared = SecretScope.objects.create(name="deploy-keys")
    services.set_secret(shared, "DEPLOY_TOKEN", VALUE + "-shared")
    with pytest.raises(InvalidPipeline):  # a scope not open to this pipeline
        builds.save_pipeline("web", NAMING, pipeline)
    shared.pipelines.add(pipeline)
    saved = builds.save_pipeline("web", NAMING, pipeline)
    assert saved.spec["stages"][0]["jobs"][0]["secrets"] == ["DEPLOY_TOKEN"]
    assert services.values_for(pipeline, ["DEPLOY_TOKEN"]) == {"DEPLOY_TOKEN": VALUE + "-shared"}
    services.set_secret(pipeline, "DEPLOY_TOKEN", VALUE)  # its own wins over a scope's
    assert services.values_for(pipeline, ["DEPLOY_TOKEN"]) == {"DEPLOY_TOKEN": VALUE}
    services.delete_secret(pipeline, "DEPLOY_TOKEN")
    services.delete_secret(shared, "DEPLOY_TOKEN")
    with pytest.raises(SecretNotFound, match="no secret 'DEPLOY_TOKEN' for pipeline web"):
        services.values_for(pipeline, ["DEPLOY_TOKEN"])


@pytest.mark.parametrize(
    ("secrets", "detail"),
    [("[1X]", "'1X' is not a valid secret name"), ("[LD_PRELOAD]", "reserved"),
     ("[A, A]", "a secret is listed twice")],
)  # fmt: skip
def test_bad_secret_names_in_the_yaml_are_refused(secrets, detail):
    with pytest.raises(InvalidPipeline, match=detail):
        builds.save_pipeline(
            "p", one_step("true").replace("{id: j,", f"{{id: j, secrets: {secrets},")
        )


def test_sealed_secrets_open_only_for_their_agent_process_and_attempt():
    agent, other = sealing.Opener(), sealing.Opener()
    sealed = sealing.seal(agent.public_key, b'{"A": "value"}', b"job 1 attempt 1")
    assert agent.open(sealed, b"job 1 attempt 1") == b'{"A": "value"}'
    for opener, context in ((other, b"job 1 attempt 1"), (agent, b"job 1 attempt 2")):
        with pytest.raises(InvalidTag):
            opener.open(sealed, context)
    assert b"value" not in sealed


def test_the_controller_seals_a_running_attempts_secrets_for_its_agent(pipeline):
    services.set_secret(pipeline, "DEPLOY_TOKEN", VALUE)
    builds.save_pipeline("web", NAMING.replace("runs-on: default", "runs-on: unit-tests"), pipeline)
    opener = sealing.Opener()
    register_agent("a1", "host", ["unit-tests"], 1, "1", public_key=opener.public_key)
    job = JobRun.objects.get(build=builds.trigger_build(pipeline))
    assert not services.seal_for_job(job.pk, job.attempt)  # not running yet: stale
    started = builds.start_job(job.pk, job.attempt, "a1")
    assert services.seal_for_job(job.pk, job.attempt)
    sealed, error = services.take_sealed(job.pk, job.attempt)
    assert error == ""
    opened = json.loads(opener.open(sealed, services.context(job.pk, job.attempt)))
    assert opened["secrets"] == {"DEPLOY_TOKEN": VALUE}
    assert tokens.attempt_of(opened["token"]) == (job.pk, job.attempt)  # for web (artifacts)
    assert services.take_sealed(job.pk, job.attempt) is None  # taken once
    delivered = SecretEvent.objects.get(action="DELIVERED")
    assert (delivered.name, delivered.build_id) == ("DEPLOY_TOKEN", started.build_id)
    assert services.seal_for_job(job.pk, job.attempt)  # asked again: sealed once, taken once
    assert services.take_sealed(job.pk, job.attempt) is None
    assert SecretEvent.objects.filter(action="DELIVERED").count() == 1
    services.delete_secret(pipeline, "DEPLOY_TOKEN")
    job = JobRun.objects.get(build=builds.trigger_build(pipeline))
    builds.start_job(job.pk, job.attempt, "a1")
    assert services.seal_for_job(job.pk, job.attempt)
    assert services.take_sealed(job.pk, job.attempt) == (
        b"",
        "no secret 'DEPLOY_TOKEN' for pipeline web (its secrets: none)",
    )


def test_an_untrusted_build_gets_no_secrets(pipeline):
    services.set_secret(pipeline, "DEPLOY_TOKEN", VALUE)
    untrusted = "untrusted: true\n" + NAMING.replace("runs-on: default", "runs-on: unit-tests")
    builds.save_pipeline("web", untrusted, pipeline)
    opener = sealing.Opener()
    register_agent("a1", "host", ["unit-tests"], 1, "1", public_key=opener.public_key)
    build = builds.trigger_build(pipeline)
    assert build.untrusted
    job = JobRun.objects.get(build=build)
    builds.start_job(job.pk, job.attempt, "a1")
    assert services.seal_for_job(job.pk, job.attempt)
    sealed, error = services.take_sealed(job.pk, job.attempt)
    opened = json.loads(opener.open(sealed, services.context(job.pk, job.attempt)))
    assert (opened["secrets"], error) == ({}, "")
    assert not SecretEvent.objects.filter(action="DELIVERED").exists()
