"""A pipeline's source in the admin, in headless Chromium: a repository added there shows its
webhook secret once (and the hook's URL), rotating it shows a new one, and Run now on a
commit opens the new build's page with its commit."""

import re

import pytest
from playwright.sync_api import Page, expect

from builds.models import Build
from forge.models import Repository
from forge.services import repositories
from tests.browser.conftest import field, screenshot
from tests.support import make_pipeline

pytestmark = pytest.mark.django_db(transaction=True)

# No agent serves "unit-tests": the build stays queued, which is all the page needs.
DEFINITION = """\
stages:
  - name: s
    jobs:
      - {id: j, runs-on: unit-tests, steps: [{run: "true"}]}
"""
SHA = "5d2e1c0ffee5d2e1c0ffee5d2e1c0ffee5d2e1c0"


def test_add_a_repository_see_its_secret_once_and_run_a_commit(admin_page: Page):
    page = admin_page
    pipeline = make_pipeline("webapp", DEFINITION)
    page.goto("/admin/forge/repository/add/")
    page.select_option("#id_pipeline", str(pipeline.pk))
    page.select_option("#id_forge", "gitea")
    page.fill("#id_clone_url", "https://user:pw@git.example/team/webapp.git")
    page.click("input[name=_save]")
    expect(page.locator(".errorlist").first).to_contain_text("no credentials")
    assert not Repository.objects.exists()

    page.fill("#id_clone_url", "https://git.example/team/webapp.git")
    page.click("input[name=_save]")
    message = page.locator(".messagelist .warning").first
    expect(message).to_contain_text("webhook secret of webapp")
    secret = message.locator("code").inner_text()
    repository = Repository.objects.get()
    assert repositories.webhook_secret(repository) == secret
    screenshot(page, "forge-repository-added")

    page.goto(f"/admin/forge/repository/{repository.pk}/change/")
    assert secret not in page.content()  # never shown again
    expect(page.locator(".field-webhook_urls")).to_contain_text(
        f"/api/pipelines/{pipeline.pk}/hooks/gitea/"
    )

    page.goto("/admin/forge/repository/")
    page.check(f"input[name=_selected_action][value='{repository.pk}']")
    page.select_option("select[name=action]", "rotate_webhook_secret")
    page.click("button[name=index]")
    rotated = page.locator(".messagelist .warning code").first.inner_text()
    assert rotated != secret
    assert repositories.webhook_secret(Repository.objects.get()) == rotated

    page.goto(f"/admin/forge/repository/{repository.pk}/change/")
    page.click("text=Run now…")
    expect(page).to_have_url(re.compile(rf"/admin/forge/repository/{repository.pk}/run/$"))
    page.fill("#id_commit", "not-a-sha")
    page.click("#run-form input[type=submit]")
    expect(page.locator(".messagelist .error")).to_contain_text("INVALID_RUN")
    assert not Build.objects.exists()
    page.fill("#id_commit", SHA)
    page.click("#run-form input[type=submit]")
    build = Build.objects.get()
    expect(page).to_have_url(re.compile(rf"/admin/builds/build/{build.pk}/change/$"))
    assert field(page, "commit") == f"{SHA[:12]} on main (manual)"
    screenshot(page, "forge-run-now")
