"""The concurrency group's admin page stays live: builds joining and leaving its queue show,
in order, without a reload (headless Chromium against the live server)."""

import re

import pytest
from django.urls import reverse
from playwright.sync_api import expect

from builds import services
from concurrency.models import ConcurrencyGroup
from tests.concurrency.test_admission import governed, policy

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_group_page_follows_its_queue(admin_page):
    page = admin_page
    pipeline = governed("deploy", policy(group_key="deploys", max_running=1, queue_length=5))
    running = services.trigger_build(pipeline)
    first = services.trigger_build(pipeline)
    assert (running.status, first.status) == ("RUNNING", "QUEUED")
    group = ConcurrencyGroup.objects.get(key="deploys")
    page.goto(reverse("admin:concurrency_concurrencygroup_change", args=(group.pk,)))
    queued = page.locator("#group-queued tbody tr")
    expect(queued).to_have_count(1)
    expect(queued.nth(0).locator("td").nth(1)).to_have_text(str(first))

    second = services.trigger_build(pipeline, priority=0)  # joins behind: no reload
    expect(queued).to_have_count(2)
    expect(queued.nth(1).locator("td").nth(0)).to_have_text("2")
    expect(queued.nth(1).locator("td").nth(1)).to_have_text(str(second))

    services.request_cancel(first.pk)  # leaves the queue: the second moves up
    expect(queued).to_have_count(1)
    expect(queued.nth(0).locator("td").nth(0)).to_have_text("1")
    expect(queued.nth(0).locator("td").nth(1)).to_have_text(str(second))
    expect(page.locator("#group-queue")).to_contain_text(re.compile(r"queued 1\b"))
    services.request_cancel(running.pk)
