"""Retention: only events older than AUDIT_RETENTION_DAYS go, in batches, by beat and the
command. The admin: read only, filterable, for staff with audit.view_auditevent."""

import io
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from audit import retention
from audit.models import AuditEvent
from ciproject.celery import app

pytestmark = pytest.mark.django_db


def event(days_ago: float, **fields) -> AuditEvent:
    values = {"username": "alice", "via": "api", "action": "build.trigger"} | fields
    return AuditEvent.objects.create(at=timezone.now() - timedelta(days=days_ago), **values)


def test_purge_takes_only_the_old_events_in_batches(settings):
    settings.AUDIT_RETENTION_DAYS = 30
    old = [event(31 + i) for i in range(5)]
    kept = [event(29), event(0)]
    assert retention.purge(batch=2, dry_run=True) == 5
    assert AuditEvent.objects.count() == 7
    assert retention.purge(batch=2) == 5  # three DELETEs of at most 2
    assert set(AuditEvent.objects.values_list("pk", flat=True)) == {e.pk for e in kept}
    assert not AuditEvent.objects.filter(pk__in=[e.pk for e in old]).exists()


def test_zero_keeps_them_for_ever(settings):
    settings.AUDIT_RETENTION_DAYS = 0
    event(5000)
    assert retention.purge() == 0
    out = io.StringIO()
    call_command("audit", "purge", stdout=out)
    assert "kept for ever" in out.getvalue()
    assert AuditEvent.objects.count() == 1


def test_the_command_and_beat(settings):
    settings.AUDIT_RETENTION_DAYS = 365
    event(400)
    event(1)
    out = io.StringIO()
    call_command("audit", "purge", "--dry-run", stdout=out)
    assert out.getvalue().startswith("would purge 1 audit events before")
    call_command("audit", "purge", stdout=out)
    assert "purged 1 audit events" in out.getvalue()
    assert AuditEvent.objects.count() == 1
    entry = app.conf.beat_schedule["purge-audit-events"]
    assert entry["task"] == "audit.tasks.purge_events"
    app.loader.import_default_modules()  # the worker's autodiscovery of the apps' tasks
    assert entry["task"] in app.tasks


ADMIN = "/admin/audit/auditevent/"


def staff(*perms, staff=True) -> Client:
    user = User.objects.create_user(f"s{User.objects.count()}", is_staff=staff)
    for perm in perms:
        user.user_permissions.add(Permission.objects.get(codename=perm))
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?action=build.trigger",
        "?actor__id__exact={actor}",
        "?token_name=deploy-bot",
        "?via=api",
        "?at__year={year}",
        "?q=web",
        "?q=192.0.2",
    ],
)
def test_the_list_and_its_filters_for_staff_with_the_view_permission(query):
    actor = User.objects.create_user("alice")
    shown = event(0, actor=actor, token_name="deploy-bot", target_label="web #1")
    shown.address = "192.0.2.7"
    shown.save()
    hidden = event(0, action="agent.drain", username="bob", target_label="a1", via="admin")
    response = staff("view_auditevent").get(
        ADMIN + query.format(actor=actor.pk, year=timezone.now().year)
    )
    assert response.status_code == 200
    listed = response.context["cl"].result_list
    assert shown in listed
    assert (hidden in listed) == (query in ("", "?at__year={year}"))


def test_others_are_refused_and_nobody_edits():
    e = event(0)
    assert staff().get(ADMIN).status_code == 403  # staff without the permission
    assert staff("change_auditevent").get(ADMIN).status_code == 403  # change alone: nothing
    response = staff("view_auditevent", staff=False).get(ADMIN)
    assert (response.status_code, response["Location"].split("?")[0]) == (302, "/admin/login/")
    root = User.objects.create_superuser("root", password=None)
    client = Client()
    client.force_login(root)
    assert client.get(ADMIN + f"{e.pk}/change/").status_code == 200  # read only
    assert client.get(ADMIN + "add/").status_code == 403
    assert client.post(ADMIN + f"{e.pk}/change/", {"username": "mallory"}).status_code == 403
    assert client.post(ADMIN + f"{e.pk}/delete/", {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.get().username == "alice"
