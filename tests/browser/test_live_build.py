"""The build page updates itself while the build runs: its status tree (BuildAdmin's live
view, a fragment the page polls every second until the build is final) and the tail of the
running step's log (the API's stream; polled where web serves none).

The first tests read the live view with Django's test client, the build moved through its
states by the services as agents and the controller would. The browser tests watch a build
run on the real agents (the `workers` fixture) in headless Chromium, without reloading the
page: on pytest-django's live server, which serves no log streams (501), so the page polls
the plain log; and on the real web server (gunicorn with ciproject.asgi, which the workers
fixture starts on the same database), where the log comes as Server-Sent Events."""

import re
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils.html import escape
from playwright.sync_api import Browser, Page, expect

from builds import services
from builds.models import Build, JobRun, StepRun
from tests.browser.conftest import screenshot
from tests.support import make_pipeline, one_step, wait_for_build

# No agent serves "unit-tests": in the test client's tests the services move these builds.
TWO_STAGES = """\
stages:
  - name: build
    jobs:
      - id: compile
        runs-on: unit-tests
        steps:
          - {name: make, run: make}
          - {name: report, run: report}
  - name: test
    jobs:
      - id: check
        runs-on: unit-tests
        steps:
          - {name: unit, run: make test}
"""


def live_url(build) -> str:
    return reverse("admin:builds_build_live", args=(build.pk,))


def change_url(build) -> str:
    return reverse("admin:builds_build_change", args=(build.pk,))


def step_named(build, name) -> StepRun:
    return StepRun.objects.select_related("job__build").get(job__build=build, name=name)


def start(build, job_key, step_name, agent="a1") -> StepRun:
    """As an agent does: job `job_key` started on `agent`, then its step `step_name`."""
    job = JobRun.objects.get(build=build, key=job_key)
    assert services.start_job(job.pk, job.attempt, agent)
    step = step_named(build, step_name)
    assert services.start_step(step)
    return step


def fail(build) -> None:
    """As the agent and the controller do: `make` fails, `report` is skipped, the job fails,
    the build moves on (and ends FAILED, its later stage skipped)."""
    make = start(build, "compile", "make")
    assert services.finish_step(make, 1, "FAILED", 2, {}) == "FAILED"
    assert services.skip_step(step_named(build, "report"), "an earlier step failed")
    assert services.finish_job(JobRun.objects.get(build=build, key="compile"), "FAILED")
    assert services.advance_build(build.pk) == "FAILED"


def succeed(build) -> None:
    """Every step succeeds, stage after stage, and so does the build."""
    make = start(build, "compile", "make")
    assert services.finish_step(make, 1, "SUCCEEDED", 0, {}) == "SUCCEEDED"
    report = step_named(build, "report")
    assert services.start_step(report)
    assert services.finish_step(report, 1, "SUCCEEDED", 0, {}) == "SUCCEEDED"
    assert services.finish_job(JobRun.objects.get(build=build, key="compile"), "SUCCEEDED")
    assert services.advance_build(build.pk) == "RUNNING"  # `check` is queued
    unit = start(build, "check", "unit")
    assert services.finish_step(unit, 1, "SUCCEEDED", 0, {}) == "SUCCEEDED"
    assert services.finish_job(JobRun.objects.get(build=build, key="check"), "SUCCEEDED")
    assert services.advance_build(build.pk) == "SUCCEEDED"


def region(html: str, name: str) -> str:
    """The inner HTML of a live region (one holding no element of its own tag), its CSRF
    tokens (masked afresh in each answer) left out."""
    found = re.search(rf'data-live-region="{name}"[^>]*>(.*?)</(li|div)>', html, re.S)
    assert found, f"no region {name}"
    return re.sub(r'name="csrfmiddlewaretoken" value="[^"]*"', "", found.group(1))


def field_html(html: str, name: str) -> str:
    found = re.search(rf'<div data-field="{name}">(.*?)</div>', html, re.S)
    assert found, f"no live field {name}"
    return found.group(1)


@pytest.fixture
def build(db):
    return services.trigger_build(make_pipeline("live", TWO_STAGES))


@pytest.fixture
def viewer(client, db):
    """A staff user who may see builds, and no more."""
    user = User.objects.create_user("viewer", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_build"))
    client.force_login(user)
    return client


# The live view, with the test client ------------------------------------------------


def test_the_live_view_of_a_running_build(admin_client, build):
    response = admin_client.get(live_url(build))
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]  # admin_view: never cached
    html = response.text
    assert f'data-build-live="{build.pk}"' in html
    assert 'data-final="0"' in html  # the page goes on polling
    assert (
        field_html(html, "status") == '<span class="ci-status" data-status="RUNNING">Running</span>'
    )
    # Cancel while it can be cancelled; no build retry while it runs.
    assert reverse("admin:builds_build_cancel", args=(build.pk,)) in region(html, "actions")
    assert "Cancel build" in region(html, "actions")
    assert "Retry build" not in html
    assert "Re-run build" not in html
    # The tree: each status as a badge; a queued job says what it waits for (if anything).
    tree = region(html, "tree")
    assert '<tr id="job-' in tree
    compile_job = JobRun.objects.get(build=build, key="compile")
    assert f'<tr id="job-{compile_job.pk}" class="job-row" data-status="QUEUED">' in tree
    assert '<span class="ci-status" data-status="QUEUED">QUEUED</span>' in tree
    assert '<span class="ci-status" data-status="PENDING">PENDING</span>' in tree
    assert "ci-ticking" not in tree  # nothing runs yet
    assert "data-log-step" not in region_state(html)  # no step started: no log to follow


def region_state(html: str) -> str:
    found = re.search(r'<span class="live-state"[^>]*>', html)
    assert found
    return found.group(0)


def test_a_running_step_counts_its_duration_and_is_the_one_followed(admin_client, build):
    make = start(build, "compile", "make")
    html = admin_client.get(live_url(build)).text
    state = region_state(html)
    assert f'data-log-step="{make.pk}"' in state
    assert 'data-log-attempt="1"' in state
    assert 'data-log-status="RUNNING"' in state
    assert f'data-log-url="/api/builds/{build.pk}/steps/{make.pk}/log/"' in state
    tree = region(html, "tree")
    row = re.search(rf'<tr id="step-{make.pk}".*?</tr>', tree, re.S).group(0)
    assert 'data-status="RUNNING"' in row
    assert re.search(r'<span class="ci-duration ci-ticking" data-started-ms="\d+">\d+s</span>', row)
    assert "a1" in tree  # the job's agent
    # The build's own duration counts too; its started time is as the admin shows it.
    assert "ci-ticking" in field_html(html, "duration_display")
    assert field_html(html, "finished_at") == "-"


def test_a_failed_build_offers_retry_and_no_cancel(admin_client, build):
    fail(build)
    html = admin_client.get(live_url(build)).text
    assert 'data-final="1"' in html  # the page stops polling
    assert (
        field_html(html, "status") == '<span class="ci-status" data-status="FAILED">Failed</span>'
    )
    actions = region(html, "actions")
    assert "Cancel build" not in actions
    assert reverse("admin:builds_build_retry", args=(build.pk,)) in actions
    assert ">Retry build</button>" in actions
    assert 'name="all"' not in actions
    make, report, unit = (step_named(build, n) for n in ("make", "report", "unit"))
    # The failed step's Retry button, and the form it submits (outside the change form).
    step_retry = reverse("admin:builds_build_step_retry", args=(build.pk, make.pk))
    assert f'<form id="retry-step-{make.pk}" method="post" action="{step_retry}" hidden>' in (
        region(html, "retry-forms")
    )
    tree = region(html, "tree")
    assert f'form="retry-step-{make.pk}"' in tree
    assert tree.count(">Retry</button>") == 1
    # The reasons of what was skipped.
    assert '<span class="ci-status" data-status="SKIPPED">SKIPPED</span>' in tree
    assert "an earlier step failed" in tree
    check = JobRun.objects.get(build=build, key="check")
    assert check.status == "SKIPPED"
    assert check.reason
    assert escape(check.reason) in tree
    # Durations of what ended stay; none counts.
    assert "ci-ticking" not in html
    assert re.search(rf'<tr id="step-{make.pk}".*?data-finished-ms="\d+">\d+s</span>', tree, re.S)
    # With nothing running, the page follows the step that started last.
    assert f'data-log-step="{make.pk}"' in region_state(html)
    assert (report.status, unit.status) == ("SKIPPED", "SKIPPED")


def test_a_succeeded_build_offers_a_re_run_of_everything(admin_client, build):
    succeed(build)
    html = admin_client.get(live_url(build)).text
    assert 'data-final="1"' in html
    actions = region(html, "actions")
    assert ">Re-run build</button>" in actions
    assert '<input type="hidden" name="all" value="1">' in actions
    assert "Cancel build" not in actions
    assert ">Retry</button>" not in html  # nothing failed
    succeeded = html.count('data-status="SUCCEEDED">SUCCEEDED</span>')
    assert succeeded == 2 + 2 + 3  # its stages, jobs and steps


def test_a_cancelling_build_offers_neither_cancel_nor_retry(admin_client, build):
    start(build, "compile", "make")
    assert services.request_cancel(build.pk) == "CANCELLING"
    html = admin_client.get(live_url(build)).text
    assert 'data-final="0"' in html  # it has yet to end
    assert field_html(html, "status") == (
        '<span class="ci-status" data-status="CANCELLING">Cancelling</span>'
    )
    assert region(html, "actions") == ""
    assert ">Retry</button>" not in html


def test_the_page_renders_the_regions_as_the_live_view_does(admin_client, build):
    fail(build)
    page = admin_client.get(change_url(build)).text
    live = admin_client.get(live_url(build)).text
    for name in ("actions", "retry-note", "retry-forms", "variables", "tree"):
        assert region(page, name) == region(live, name), name
    assert field_html(page, "status") == field_html(live, "status")
    # The page carries what its script needs: where to poll, how much log to keep.
    assert f'data-live-url="{live_url(build)}"' in page
    assert 'data-tail-lines="2000"' in page
    assert "new EventSource(" in page
    assert "?follow=1&attempt=" in page


def test_a_viewer_sees_the_live_view_without_buttons(viewer, build):
    fail(build)
    html = viewer.get(live_url(build)).text
    assert 'data-final="1"' in html
    assert region(html, "actions") == ""
    assert region(html, "retry-forms") == ""
    assert ">Retry</button>" not in html


def test_the_live_view_needs_to_see_the_build(client, build):
    response = client.get(live_url(build))  # anonymous: the login page
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    staff = User.objects.create_user("staff", password="x", is_staff=True)
    client.force_login(staff)
    # Who sees nothing of the pipeline is told nothing: a build there and none are alike.
    assert client.get(live_url(build)).status_code == 404
    assert client.get(reverse("admin:builds_build_live", args=(0,))).status_code == 404
    staff.user_permissions.add(Permission.objects.get(codename="view_build"))
    client.force_login(User.objects.get(pk=staff.pk))
    assert client.get(live_url(build)).status_code == 200
    assert client.get(reverse("admin:builds_build_live", args=(0,))).status_code == 404


def test_the_live_view_escapes_what_builds_say(admin_client, db):
    pipeline = make_pipeline("hostile", one_step("echo '<script>x</script>'", runs_on="unit-tests"))
    build = services.trigger_build(pipeline)
    job = JobRun.objects.get(build=build)
    JobRun.objects.filter(pk=job.pk).update(reason="waits <b>here</b>")  # as a reason may say
    html = admin_client.get(live_url(build)).text
    assert "waits &lt;b&gt;here&lt;/b&gt;" in html
    assert "<b>here</b>" not in html
    assert "echo &#x27;&lt;script&gt;x&lt;/script&gt;&#x27;" in html
    assert "<script>" not in html


# In the browser, on real agents ---------------------------------------------------------

# Prints a line, waits for the test's gate, then prints a line a second.
COUNTING = """\
variables:
  GATE: ""
stages:
  - name: count
    jobs:
      - id: counter
        runs-on: linux
        steps:
          - name: prepare
            run: echo ready
          - name: lines
            run: |
              echo line 1
              until [ -f "$GATE" ]; do sleep 0.05; done
              for i in 2 3 4 5; do echo line $i; sleep 1; done
"""


def watch_a_build_run(page: Page, tmp_path: Path, name: str) -> Build:
    """Trigger a COUNTING build, open its page once, and watch it run to its end there: its
    status, its tree, its durations, its buttons and its log change without a reload."""
    gate = tmp_path / "gate"
    build = services.trigger_build(make_pipeline(name, COUNTING), {"GATE": str(gate)})
    lines = step_named(build, "lines")
    page.goto(change_url(build))
    page.evaluate("window.notReloaded = true")  # gone if the page were loaded again

    row = page.locator(f"#step-{lines.pk}")
    status = page.locator(".field-status .readonly")
    log = page.locator("#live-log-text")
    expect(row.locator("td").nth(1)).to_have_text("RUNNING", timeout=30_000)
    expect(status).to_have_text("Running")
    expect(page.locator("#live-log-title")).to_have_text("counter / lines, attempt 1")
    expect(log).to_have_text("line 1\n")
    expect(page.locator("li.build-actions")).to_have_text("Cancel build")
    # What runs counts its duration on between the page's fetches.
    duration = row.locator(".ci-duration.ci-ticking")
    before = duration.inner_text()
    expect(duration).not_to_have_text(before, timeout=5_000)
    row.locator("summary").click()  # its command, open: the updates keep it open
    screenshot(page, f"{name}-running")

    gate.touch()
    expect(log).to_contain_text("line 2\n")
    # Every line, in order, once (the agent's note of the exit code may follow).
    all_lines = re.compile(r"^line 1\nline 2\nline 3\nline 4\nline 5\n(\[ciproject\][^\n]*\n?)*$")
    expect(log).to_have_text(all_lines, timeout=20_000)
    expect(row.locator("td").nth(1)).to_have_text("SUCCEEDED", timeout=20_000)
    expect(status).to_have_text("Succeeded", timeout=20_000)
    expect(page.locator(f"#job-{lines.job_id} td").nth(1)).to_have_text("SUCCEEDED")
    expect(page.locator(".field-finished_at .readonly")).not_to_have_text("-")
    expect(page.locator(".field-duration_display .readonly")).to_have_text(re.compile(r"^\d+s$"))
    expect(page.locator(".ci-ticking")).to_have_count(0)
    # The buttons follow the status: no cancel once it has ended, a re-run instead.
    expect(page.locator("li.build-actions")).to_have_text("Re-run build")
    expect(page.locator("#live-log-note")).to_have_text("ended SUCCEEDED")
    # Final: the page stopped polling (and says so on its panel).
    expect(page.locator("#live-log")).to_have_attribute("data-live", "stopped")
    expect(row.locator("details")).to_have_attribute("open", "")
    screenshot(page, f"{name}-succeeded")

    # Any step's log may be followed instead ("tail"), and the running one again after.
    prepare = step_named(build, "prepare")
    page.locator(f"#step-{prepare.pk} a.live-tail").click()
    expect(page.locator("#live-log-title")).to_have_text("counter / prepare, attempt 1")
    expect(log).to_have_text(re.compile(r"^ready\n"))
    page.click("#live-log-auto")
    expect(page.locator("#live-log-title")).to_have_text("counter / lines, attempt 1")
    expect(log).to_have_text(all_lines)
    assert page.evaluate("window.notReloaded") is True
    assert wait_for_build(build).status == "SUCCEEDED"
    return build


def responses_to(page: Page, pattern: str) -> list:
    seen = []
    page.on("response", lambda r: re.search(pattern, r.url) and seen.append(r))
    return seen


@pytest.mark.usefixtures("workers")
@pytest.mark.django_db(transaction=True)
def test_the_page_follows_a_build_on_the_live_server_polling_the_log(admin_page, tmp_path):
    page = admin_page
    streams = responses_to(page, r"/log/\?follow=1")
    texts = responses_to(page, r"/log/\?attempt=\d+$")
    live = responses_to(page, r"/live/$")
    build = watch_a_build_run(page, tmp_path, "polled")
    # This server (WSGI alone) serves no streams: the page asked once a step, was refused
    # with 406 (an EventSource accepts text/event-stream alone), then polled the text.
    assert streams
    assert {r.status for r in streams} == {406}
    assert texts
    assert {r.status for r in texts} == {200}
    assert len(live) >= 3
    assert Build.objects.get(pk=build.pk).status == "SUCCEEDED"


@pytest.mark.django_db(transaction=True)
def test_the_page_follows_a_build_on_the_real_server_streaming_the_log(
    chromium: Browser, workers, worker_env, tmp_path, request
):
    server = worker_env["AGENT_SERVER_URL"]
    password = "a-long-password-4-the-real-server"
    User.objects.create_superuser("streamer", "ops@example.com", password)
    context = chromium.new_context(base_url=server, viewport={"width": 1440, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    try:
        page.goto("/admin/login/?next=/admin/")
        page.fill("#id_username", "streamer")
        page.fill("#id_password", password)
        with page.expect_navigation():
            page.click("input[type=submit]")
        expect(page.locator("#user-tools strong")).to_have_text("streamer")
        streams = responses_to(page, r"/log/\?follow=1")
        texts = responses_to(page, r"/log/\?attempt=\d+$")
        watch_a_build_run(page, tmp_path, "streamed")
        # The log came as Server-Sent Events, and was never polled.
        assert streams
        assert {r.status for r in streams} == {200}
        assert {r.headers["content-type"] for r in streams} == {"text/event-stream; charset=utf-8"}
        assert texts == []
    except BaseException:
        screenshot(page, f"failed-{request.node.name}")
        raise
    finally:
        context.close()
