"""Fixtures of the browser tests: Debian's Chromium (/usr/bin/chromium, never a downloaded
browser) driven by Playwright against pytest-django's live server, which serves the admin and
its static files from a thread of the pytest process on the test database."""

import os
import re
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import Page, expect, sync_playwright

from tests.support import wait_until

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
USERNAME, PASSWORD = "operator", "a-long-password-4-the-browser"


@pytest.fixture(scope="module")
def chromium():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser tests need Debian's chromium"
            " (apt-get install -y --no-install-recommends chromium)"
        )
    # Playwright's sync API leaves its event loop marked as running in this thread while the
    # browser is open, so Django would take the tests' ORM calls (and the test database's
    # flush) for calls from async code and refuse them. They are not: allow them, for as long
    # as the browser is open only (the session's worker processes were started before).
    with pytest.MonkeyPatch.context() as env, sync_playwright() as playwright:
        env.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.call_failed = report.failed


@pytest.fixture
def page(chromium, live_server, request):
    """A fresh browser context on the live server; a failed test leaves a screenshot."""
    viewport = {"width": 1440, "height": 900}
    context = chromium.new_context(base_url=live_server.url, viewport=viewport)
    context.set_default_timeout(15_000)
    expect.set_options(timeout=15_000)
    page = context.new_page()
    page.static_failures = []  # static files that did not load
    page.on(
        "response",
        lambda r: "/static/" in r.url and not r.ok and page.static_failures.append(r.url),
    )
    page.on(
        "requestfailed",
        lambda r: "/static/" in r.url and page.static_failures.append(r.url),
    )
    yield page
    if getattr(request.node, "call_failed", False):
        screenshot(page, f"failed-{request.node.name}")
    context.close()


@pytest.fixture
def admin_page(page: Page, settings) -> Page:
    """The page of an operator (a superuser) logged in through the admin's login form."""
    # A fast hasher: the default's many rounds cost a second per login, not what is tested.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    User.objects.create_superuser(USERNAME, "ops@example.com", PASSWORD)
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/\?next=/admin/$"))
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    with page.expect_navigation():
        page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_have_text("Django administration")
    expect(page.locator("#user-tools strong")).to_have_text(USERNAME)
    # The admin's own CSS loaded from the live server: the header has its colour.
    header_bg = page.eval_on_selector("#header", "e => getComputedStyle(e).backgroundColor")
    assert header_bg not in ("", "rgba(0, 0, 0, 0)"), header_bg
    assert page.static_failures == []
    return page


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def field(page: Page, name: str) -> str:
    """The text of a read-only field of an admin change page."""
    return page.locator(f".field-{name} .readonly").inner_text().strip()


def reload_until(page: Page, predicate, timeout: float = 30, message: str = ""):
    """Reload the page until `predicate(page)` holds, or fail after `timeout` s."""

    def check():
        page.reload()
        return predicate(page)

    return wait_until(check, timeout, interval=0.25, message=message or str(predicate))
