"""The operators' console end to end: the Django admin in headless Chromium against the live
server, with a real controller, beat and agents running the builds (the `workers` fixture).
Each test waits on what the pages show, reloading them up to a deadline."""

import re
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from agents.models import Agent, AgentStatus
from builds import services
from builds.models import Build, PartitionState, StepRun
from builds.statuses import BuildStatus
from concurrency.models import ConcurrencyPolicy
from tests.browser.conftest import field, reload_until, screenshot
from tests.builds.test_partitions import build_at, partition_of
from tests.support import make_pipeline, raw_connection, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]

HELLO = """\
variables:
  GREETING: hello
stages:
  - name: build
    jobs:
      - id: compile
        runs-on: linux
        steps:
          - name: say
            run: echo "$GREETING from the admin"
          - name: count
            run: seq 1 500
  - name: test
    jobs:
      - id: check
        steps:
          - name: greeting-is-overridden
            run: test "$GREETING" = "hi there"
"""

# The step ignores SIGTERM (and so does its `sleep`, which inherits that), so the build stays
# CANCELLING for the agent's kill grace period (3 s in the tests) before the SIGKILL.
HANGING = """\
concurrency: hangs
stages:
  - name: work
    jobs:
      - id: hang
        runs-on: linux
        steps:
          - name: sleeps
            run: |
              trap '' TERM
              echo started
              sleep 600
  - name: after
    jobs:
      - {id: later, steps: [{name: never, run: echo never}]}
"""

# Fails on its first attempt, succeeds on the next.
FLAKY = """\
stages:
  - name: s
    jobs:
      - id: flaky
        runs-on: linux
        steps:
          - name: flaky-step
            run: |
              echo "attempt $CI_STEP_ATTEMPT"
              test "$CI_STEP_ATTEMPT" -gt 1
  - name: t
    jobs:
      - {id: after, steps: [{name: after-step, run: echo after}]}
"""


def step_of(build: Build, name: str) -> StepRun:
    return StepRun.objects.get(job__build=build, name=name)


def step_cells(page: Page, step: StepRun) -> tuple[str, str]:
    """(status, attempt) of a step, as the build page's stage/job/step tree shows them."""
    cells = page.locator(f"#step-{step.pk} td")
    return cells.nth(1).inner_text().strip(), cells.nth(2).inner_text().strip()


def submit(page: Page, selector: str) -> None:
    with page.expect_navigation():
        page.click(selector)


def wait_for_status(page: Page, status: BuildStatus, timeout: float = 30) -> None:
    """Reload the build page until its status field shows `status` (by its label)."""
    reload_until(
        page, lambda p: field(p, "status") == status.label, timeout, message=f"status {status}"
    )


def messages(page: Page):
    return page.locator("ul.messagelist li")


def test_trigger_a_build_and_watch_it_succeed(admin_page: Page):
    page = admin_page
    pipeline = make_pipeline("hello", HELLO)
    make_pipeline("other", HELLO)  # two pipelines: the build list offers the pipeline filter

    page.click("a:text-is('Pipelines')")
    page.click(f"a:text-is('{pipeline.name}')")
    page.click("a.trigger-link")
    expect(page.locator("#trigger-defaults")).to_contain_text("GREETING")
    # A bad line is refused with its code; nothing is created and the input stays.
    page.fill("#id_variables", "GREETING=hi there\n1BAD=x")
    submit(page, "#trigger-form input[type=submit]")
    expect(messages(page)).to_have_text(re.compile(r"^INVALID_VARIABLES: .*'1BAD'"))
    expect(page.locator("#id_variables")).to_have_value("GREETING=hi there\n1BAD=x")
    screenshot(page, "trigger-refused")
    assert not Build.objects.exists()

    page.fill("#id_variables", "GREETING=hi there\r\n")
    submit(page, "#trigger-form input[type=submit]")
    build = Build.objects.get()
    expect(page).to_have_url(re.compile(rf"/admin/builds/build/{build.pk}/change/$"))
    expect(messages(page)).to_have_text("Build hello #1 triggered: RUNNING")
    assert build.triggered_by.username == "operator"

    wait_for_status(page, BuildStatus.SUCCEEDED)
    assert step_cells(page, step_of(build, "greeting-is-overridden")) == ("SUCCEEDED", "1")
    expect(page.locator(".field-variables_table")).to_contain_text("GREETINGhi theretrigger")
    # Each job shows the agent that ran it.
    expect(page.locator(".field-jobs_tree")).to_contain_text(re.compile(r"agent-[12]"))
    expect(page.locator(".field-attempt .readonly")).to_have_text("1")
    screenshot(page, "build-page")

    # Each step's log: its tail, with a link to the whole.
    page.locator(f"#step-{step_of(build, 'say').pk}").get_by_role("link", name="log").click()
    expect(page.locator("#content-main pre")).to_contain_text("hi there from the admin\n")
    page.go_back()
    page.locator(f"#step-{step_of(build, 'count').pk}").get_by_role("link", name="log").click()
    log = page.locator("#content-main pre")
    expect(log).to_contain_text("\n500\n")
    expect(log).not_to_contain_text(re.compile(r"^1\n"))
    expect(page.locator("#content-main")).to_contain_text(re.compile(r"The first \d+ lines"))
    page.click("text=Show whole log")
    expect(log).to_contain_text(re.compile(r"^1\n2\n3\n"))
    expect(log).to_contain_text("\n500\n")

    # The build list, filtered on its status in the sidebar.
    page.goto("/admin/builds/build/")
    page.click(f"#changelist-filter a:text-is('{BuildStatus.SUCCEEDED.label}')")
    page.click("#changelist-filter a:text-is('hello')")
    expect(page).to_have_url(re.compile(r"status__exact=SUCCEEDED"))
    expect(page).to_have_url(re.compile(rf"pipeline__id__exact={pipeline.pk}"))
    row = page.locator("#result_list tbody tr")
    expect(row).to_have_count(1)
    for text in ("hello", "1", BuildStatus.SUCCEEDED.label, "operator"):
        expect(row).to_contain_text(text)
    expect(row.locator("td.field-duration_display")).to_have_text(re.compile(r"\d"))
    screenshot(page, "build-list")


DEPLOY = """\
parameters:
  TARGET:
    description: where it goes
    choices: [staging, production]
    required: true
  BRANCH:
    default: main
    pattern: "[a-z][a-z0-9/_-]*"
stages:
  - name: s
    jobs:
      - id: deploy
        steps:
          - {name: say, run: 'echo "deploying $BRANCH to $TARGET"'}
"""


def test_trigger_a_pipeline_by_its_parameters(admin_page: Page):
    page = admin_page
    pipeline = make_pipeline("deploy", DEPLOY)
    page.click("a:text-is('Pipelines')")
    page.click(f"a:text-is('{pipeline.name}')")
    page.click("a.trigger-link")
    expect(page.locator("#id_variables")).to_have_count(0)  # the parameters' fields instead
    expect(page.locator("#id_parameter_TARGET option")).to_have_text(
        ["---------", "staging", "production"]
    )
    expect(page.locator("#id_parameter_BRANCH")).to_have_value("main")
    screenshot(page, "trigger-parameters")
    # A value outside the pattern is refused by the service, naming the parameter.
    page.select_option("#id_parameter_TARGET", "staging")
    page.fill("#id_parameter_BRANCH", "Not/Lower")
    submit(page, "#trigger-form input[type=submit]")
    expect(messages(page)).to_have_text(
        re.compile(r"^INVALID_VARIABLES: variables\.BRANCH: 'Not/Lower' does not match")
    )
    assert not Build.objects.exists()
    page.fill("#id_parameter_BRANCH", "release/2")
    submit(page, "#trigger-form input[type=submit]")
    build = Build.objects.get()
    expect(page).to_have_url(re.compile(rf"/admin/builds/build/{build.pk}/change/$"))
    wait_for_status(page, BuildStatus.SUCCEEDED)
    expect(page.locator(".field-variables_table")).to_contain_text("BRANCHrelease/2trigger")
    expect(page.locator(".field-variables_table")).to_contain_text("TARGETstagingtrigger")


def test_cancel_a_running_build(admin_page: Page):
    page = admin_page
    ConcurrencyPolicy.objects.create(name="hangs", max_running=1)
    build = services.trigger_build(make_pipeline("hang", HANGING))
    step = step_of(build, "sleeps")
    # The step runs (and ignores SIGTERM) once it has printed "started".
    wait_until(lambda: "started" in services.step_log(step), message="the step to start")

    # Its policy counts it among its group's running builds.
    page.goto("/admin/concurrency/concurrencypolicy/")
    row = page.locator("#result_list tbody tr", has_text="hangs")
    expect(row.locator("td.field-running_count")).to_have_text("1")
    expect(row.locator("td.field-queued_count")).to_have_text("0")

    page.goto(f"/admin/builds/build/{build.pk}/change/")
    assert field(page, "status") == BuildStatus.RUNNING.label
    assert step_cells(page, step) == ("RUNNING", "1")
    submit(page, "text=Cancel build")
    expect(messages(page)).to_have_text("Build hang #1: CANCELLING")
    assert field(page, "status") == BuildStatus.CANCELLING.label
    expect(page.locator("text=Cancel build")).to_have_count(0)  # no second cancel

    wait_for_status(page, BuildStatus.CANCELED)
    assert step_cells(page, step) == ("CANCELED", "1")
    assert step_cells(page, step_of(build, "never")) == ("CANCELED", "1")  # never started
    page.locator(f"#step-{step.pk}").get_by_role("link", name="log").click()
    expect(page.locator("#content-main pre")).to_contain_text(re.compile(r"^started\n"))
    expect(page.locator("#content-main pre")).to_contain_text("cancel")


def test_retry_a_failed_step(admin_page: Page):
    page = admin_page
    build = services.trigger_build(make_pipeline("flaky", FLAKY))
    flaky, after = step_of(build, "flaky-step"), step_of(build, "after-step")

    page.goto(f"/admin/builds/build/{build.pk}/change/")
    wait_for_status(page, BuildStatus.FAILED)
    assert step_cells(page, flaky) == ("FAILED", "1")
    assert step_cells(page, after) == ("SKIPPED", "1")
    # Only the failed step has a Retry button.
    expect(page.locator(f"#step-{after.pk} button")).to_have_count(0)
    submit(page, f"#step-{flaky.pk} button:text-is('Retry')")
    expect(messages(page)).to_have_text("Build flaky #1: step 'flaky-step' retried, attempt 2")
    assert step_cells(page, flaky)[1] == "2"

    wait_for_status(page, BuildStatus.SUCCEEDED)
    assert step_cells(page, flaky) == ("SUCCEEDED", "2")
    assert step_cells(page, after) == ("SUCCEEDED", "1")
    expect(page.locator(f"#step-{flaky.pk} button")).to_have_count(0)
    # The log page shows the new attempt, and the first one on request.
    page.locator(f"#step-{flaky.pk}").get_by_role("link", name="log").click()
    expect(page.locator("#content-main pre")).to_contain_text(re.compile(r"^attempt 2\n"))
    page.click("#content-main a:text-is('1')")
    expect(page.locator("#content-main pre")).to_contain_text(re.compile(r"^attempt 1\n"))
    expect(page.locator("#content-main pre")).to_contain_text("exit code 1")


@pytest.mark.usefixtures("no_old_partitions")
def test_retry_is_disabled_with_its_reason_outside_the_retry_window(admin_page: Page):
    page = admin_page
    # A build of 60 days ago whose variables' partition is gone: it cannot be retried.
    build = build_at(timezone.now() - timedelta(days=60))
    with raw_connection() as admin:
        admin.execute(f'DROP TABLE "{partition_of(build)}"')
    reason = services.can_retry(build).reason
    assert "kept for 90 days" in reason

    page.goto(f"/admin/builds/build/{build.pk}/change/")
    button = page.locator("button.retry-disabled")
    expect(button).to_be_disabled()
    expect(button).to_have_text("Retry build")
    expect(button).to_have_attribute("title", reason)
    expect(page.locator("p.retry-refused")).to_have_text(f"Retry is not possible: {reason}")
    # Its variables went with their partition; nothing ran, so no duration.
    assert (field(page, "variables_table"), field(page, "duration_display")) == ("-", "-")
    screenshot(page, "retry-disabled")
    assert Build.objects.get(pk=build.pk).attempt == 1


def test_a_policy_with_an_invalid_value_shows_the_error(admin_page: Page):
    page = admin_page
    policy = ConcurrencyPolicy.objects.create(name="deploys", max_running=2)

    page.goto("/admin/concurrency/concurrencypolicy/")
    submit(page, "a:text-is('deploys')")
    page.fill("#id_max_running", "0")
    # The input's min comes from the model's validator, so a browser flags the value ...
    assert page.eval_on_selector("#id_max_running", "e => e.validity.rangeUnderflow")
    # ... and the server refuses it too, for a client that does not check.
    page.eval_on_selector("#concurrencypolicy_form", "f => f.noValidate = true")
    submit(page, "input[name=_save]")
    expect(page.locator(".errornote")).to_be_visible()
    expect(page.locator(".field-max_running .errorlist")).to_have_text(
        "Ensure this value is greater than or equal to 1."
    )
    screenshot(page, "policy-error")
    assert ConcurrencyPolicy.objects.get(pk=policy.pk).max_running == 2

    # A valid value is saved and shown in the list, with the groups' live counts.
    page.fill("#id_max_running", "3")
    submit(page, "input[name=_save]")
    expect(messages(page)).to_contain_text("was changed successfully")
    row = page.locator("#result_list tbody tr", has_text="deploys")
    expect(row.locator("td.field-max_running")).to_have_text("3")
    expect(row.locator("td.field-running_count")).to_have_text("0")
    expect(row.locator("td.field-queued_count")).to_have_text("0")
    assert ConcurrencyPolicy.objects.get(pk=policy.pk).max_running == 3


def test_agents_with_their_heartbeat_and_drain_toggle(admin_page: Page, dedicated):
    page = admin_page
    dedicated("agent-drain", "browser-drain")  # an agent of its own, to drain
    page.goto("/admin/agents/agent/")
    names = ("agent-1", "agent-2", "agent-drain")

    def statuses(page):  # an agent registers again within a heartbeat of the last test's flush
        rows = [page.locator("#result_list tbody tr", has_text=name) for name in names]
        return [r.locator("td.field-status").all_inner_texts() for r in rows]

    online = [[AgentStatus.ONLINE.label]] * len(names)
    reload_until(page, lambda p: statuses(p) == online, timeout=10, message="agents online")
    for name in names:
        row = page.locator("#result_list tbody tr", has_text=name)
        expect(row.locator("td.field-heartbeat_age")).to_have_text(re.compile(r"^\d+$"))

    page.click("a:text-is('agent-drain')")
    expect(page.locator(".field-heartbeat_age .readonly")).to_have_text(re.compile(r"^\d+$"))
    page.select_option("#id_status", AgentStatus.DISABLED.value)
    submit(page, "input[name=_save]")
    expect(messages(page)).to_contain_text("was changed successfully")
    row = page.locator("#result_list tbody tr", has_text="agent-drain")
    expect(row.locator("td.field-status")).to_have_text(AgentStatus.DISABLED.label)
    assert Agent.objects.get(name="agent-drain").status == AgentStatus.DISABLED


def test_variable_partitions_with_their_state(admin_page: Page):
    page = admin_page
    page.goto("/admin/builds/variablepartition/")
    today = page.locator("#result_list tbody tr", has_text=f"_p{timezone.now():%Y%m%d}")
    expect(today.locator("td.field-state")).to_have_text(PartitionState.LIVE.label)
    expect(today.locator("td.field-rows_estimate")).to_have_text(re.compile(r"^-?\d+$"))
