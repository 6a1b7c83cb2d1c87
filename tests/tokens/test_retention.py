"""Dead tokens are purged API_TOKEN_KEEP_DAYS after they died (revoked or expired), by the
command and beat's task; live ones and the recently dead stay, and a purged token's value is
then an unknown token."""

import io
from datetime import timedelta

import pytest
import time_machine
from django.core.management import call_command
from django.utils import timezone

from builds import services as builds
from ciproject.celery import app
from tests.support import one_step, user_with
from tokens import retention, services, tasks
from tokens.models import ApiToken

pytestmark = pytest.mark.django_db


@pytest.fixture
def tokens(settings):
    """Tokens of one owner: live, expired 31 days ago, expired 29 days ago, revoked 31 days
    ago, revoked a day ago; each limited to a pipeline (rows of a many-to-many to go too)."""
    settings.API_TOKEN_KEEP_DAYS = 30
    owner = user_with()
    pipeline = builds.save_pipeline("p", one_step("true"))
    now = timezone.now()
    made = {}
    for name, born in [("live", 0), ("expired-long", 32), ("expired-lately", 30)]:
        with time_machine.travel(now - timedelta(days=born), tick=False):
            made[name] = services.create_token(owner, name, days=1, pipelines=[pipeline.pk])[0]
    for name, died in [("revoked-long", 31), ("revoked-lately", 1)]:
        made[name] = services.create_token(owner, name, pipelines=[pipeline.pk])[0]
        with time_machine.travel(now - timedelta(days=died), tick=False):
            services.revoke_token(made[name], owner)
    return made


def names() -> set[str]:
    return set(ApiToken.objects.values_list("name", flat=True))


def test_the_long_dead_are_purged_with_their_pipeline_rows(tokens):
    assert retention.purge(dry_run=True) == 2
    assert names() == set(tokens)
    assert retention.purge(batch=1) == 2
    assert names() == {"live", "expired-lately", "revoked-lately"}
    through = ApiToken.pipelines.through.objects
    assert set(through.values_list("apitoken__name", flat=True)) == names()
    assert retention.purge() == 0


def test_the_command_and_beats_task(tokens, settings):
    out = io.StringIO()
    call_command("tokens", "purge", "--dry-run", stdout=out)
    assert out.getvalue().startswith("would purge 2 tokens revoked or expired before")
    assert names() == set(tokens)
    assert tasks.purge_tokens() == 2
    settings.API_TOKEN_KEEP_DAYS = 0
    call_command("tokens", "purge", stdout=(out := io.StringIO()))
    assert "kept for ever" in out.getvalue()
    assert retention.purge(now=timezone.now() + timedelta(days=3650)) == 0
    assert len(names()) == 3


def test_beat_purges_them():
    entry = app.conf.beat_schedule["purge-dead-tokens"]
    assert entry["task"] == "tokens.tasks.purge_tokens"
    app.loader.import_default_modules()  # the worker's autodiscovery of the apps' tasks
    assert entry["task"] in app.tasks
