"""cictl trigger, status, cancel, retry and retry-step against the live server and real
agents: exact output and exit codes."""

import json
import os
import pty
import re
import select
import signal
import subprocess

import pytest
from rest_framework.test import APIClient

from builds.models import Build, StepRun
from tests.cictl.conftest import CICTL, normalize
from tests.support import make_pipeline, wait_for_build, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = """
variables: {GREETING: hello}
stages:
  - name: build
    jobs:
      - id: greet
        steps:
          - {name: say, run: 'echo "$GREETING world"'}
  - name: test
    jobs:
      - {id: check, steps: [{name: look, run: 'test -n "$CI_BUILD_ID"'}]}
"""

BROKEN = """
stages:
  - name: build
    jobs:
      - id: compile
        steps:
          - {name: ok, run: echo fine}
          - {name: broken, run: "echo about to fail; exit 3"}
          - {name: never, run: echo never}
  - name: deploy
    jobs:
      - {id: ship, steps: [{name: push, run: echo shipped}]}
"""

# Fails on its first attempt, succeeds on the next.
FLAKY = """
stages:
  - name: build
    jobs:
      - {id: ok, steps: [{name: fine, run: echo fine}]}
      - id: shaky
        steps:
          - {name: flaky, run: 'echo "try $CI_STEP_ATTEMPT"; test "$CI_STEP_ATTEMPT" -ge 2'}
  - name: after
    jobs:
      - {id: last, steps: [{name: done, run: echo done}]}
"""

HANGS = """
stages:
  - name: work
    jobs:
      - {id: hang, steps: [{name: sleeps, run: "echo started; sleep 600"}]}
"""


def lines(*text: str) -> str:
    return "".join(f"{line}\n" for line in text)


def the_build() -> Build:
    return Build.objects.get()


def test_trigger_wait_on_a_succeeding_pipeline_exits_0_with_its_tree(cictl):
    make_pipeline("hello", HELLO)
    result = cictl("trigger", "hello", "-p", "GREETING=hi", "--wait")
    build = the_build()
    assert (result.code, result.err) == (0, "")
    assert normalize(result.out) == lines(
        f"build {build.pk}  hello #1  RUNNING",
        f"build {build.pk}  hello #1  SUCCEEDED  attempt 1  T",
        "  stage build  SUCCEEDED",
        "    job greet  SUCCEEDED  attempt 1  on AGENT  T",
        "      step say  SUCCEEDED  exit 0  attempt 1  T",
        "  stage test  SUCCEEDED",
        "    job check  SUCCEEDED  attempt 1  on AGENT  T",
        "      step look  SUCCEEDED  exit 0  attempt 1  T",
    )
    assert build.status == "SUCCEEDED"
    assert {v.name: v.value for v in build.variables.all()} == {"GREETING": "hi"}


def test_trigger_wait_on_a_failing_pipeline_exits_1_with_the_reasons(cictl):
    make_pipeline("broken", BROKEN)
    result = cictl("trigger", "broken", "--wait")
    build = the_build()
    assert (result.code, result.err) == (1, "")
    assert normalize(result.out) == lines(
        f"build {build.pk}  broken #1  RUNNING",
        f"build {build.pk}  broken #1  FAILED  attempt 1  T",
        "  stage build  FAILED",
        "    job compile  FAILED  attempt 1  on AGENT  T  reason: step 'broken' ended FAILED",
        "      step ok  SUCCEEDED  exit 0  attempt 1  T",
        "      step broken  FAILED  exit 3  attempt 1  T",
        "      step never  SKIPPED",
        "  stage deploy  SKIPPED",
        "    job ship  SKIPPED  reason: waited for the earlier stages, where 'compile' ended"
        " FAILED",
        "      step push  SKIPPED",
    )


def test_trigger_without_wait_prints_the_build_at_once_by_name_or_id(cictl):
    pipeline = make_pipeline("hello", HELLO)
    result = cictl("trigger", "hello")
    first = Build.objects.get(number=1)
    assert (result.code, result.out, result.err) == (
        0,
        f"build {first.pk}  hello #1  RUNNING\n",
        "",
    )

    result = cictl("trigger", str(pipeline.pk), "--json", "-p", "GREETING=x=y")
    second = Build.objects.get(number=2)
    assert (result.code, result.err) == (0, "")
    answer = json.loads(result.out)  # nothing but the API's JSON
    assert (answer["id"], answer["number"], answer["pipeline"]) == (second.pk, 2, pipeline.pk)
    assert answer["status"] == "RUNNING"
    assert second.variables.get().value == "x=y"  # split at the first "="
    for build in (first, second):
        wait_for_build(build)


def test_a_refused_trigger_exits_3_with_the_servers_code(cictl):
    make_pipeline("hello", HELLO)
    result = cictl("trigger", "hello", "-p", "NOPE=1")
    assert (result.code, result.out) == (3, "")
    assert result.err == lines(
        "error INVALID_VARIABLES: variables.NOPE: not a variable of this pipeline, which a"
        " trigger may not add (its variables: GREETING)",
        '  variable: "NOPE"',
    )
    assert not Build.objects.exists()

    result = cictl("trigger", "Hello")
    assert (result.code, result.out) == (3, "")
    assert (
        result.err
        == "error PIPELINE_NOT_FOUND: no pipeline is named 'Hello'; did you mean 'hello'?\n"
    )
    result = cictl("trigger", "999999")
    assert (result.code, result.err) == (3, "error NOT_FOUND: Not found.\n")


def test_usage_errors_exit_2(cictl):
    make_pipeline("hello", HELLO)
    result = cictl("trigger", "hello", "-p", "GREETING")
    assert (result.code, result.out) == (2, "")
    assert "'GREETING' is not KEY=VALUE" in result.err
    result = cictl("trigger", "hello", "-p", "GREETING=a", "-p", "GREETING=b")
    assert (result.code, result.out) == (2, "")
    assert "GREETING is given twice" in result.err
    assert cictl("status", "abc").code == 2
    assert cictl("trigger").code == 2
    assert cictl("frobnicate").code == 2
    assert not Build.objects.exists()


def test_the_same_idempotency_key_makes_one_build(cictl):
    make_pipeline("hello", HELLO)
    first = cictl("trigger", "hello", "--idempotency-key", "release-1", "--wait")
    build = the_build()
    assert (first.code, first.err) == (0, "")
    again = cictl("trigger", "hello", "--idempotency-key", "release-1")
    assert (again.code, again.out) == (0, f"build {build.pk}  hello #1  SUCCEEDED\n")
    assert again.err == f"build {build.pk} was made earlier by a trigger with this key\n"
    assert Build.objects.count() == 1
    refused = cictl("trigger", "hello", "--idempotency-key", "release-1", "-p", "GREETING=x")
    assert (refused.code, refused.out) == (3, "")
    assert refused.err.startswith("error IDEMPOTENCY_KEY_REUSED: ")


def test_status_json_is_the_apis_build(cictl):
    make_pipeline("broken", BROKEN)
    assert cictl("trigger", "broken", "--wait").code == 1
    build = the_build()
    result = cictl("status", str(build.pk), "--json")
    assert (result.code, result.err) == (0, "")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {cictl.token}")
    assert json.loads(result.out) == api.get(f"/api/builds/{build.pk}/").json()

    plain = cictl("status", str(build.pk))
    assert plain.code == 0
    assert normalize(plain.out).splitlines()[:2] == [
        f"build {build.pk}  broken #1  FAILED  attempt 1  T",
        "  stage build  FAILED",
    ]
    # --wait on a build that has ended: at once, with the build's exit code.
    waited = cictl("status", str(build.pk), "--wait")
    assert (waited.code, waited.out) == (1, plain.out)


def test_cancel_a_running_build(cictl):
    make_pipeline("hangs", HANGS)
    started = cictl("trigger", "hangs")
    build = the_build()
    assert started.out == f"build {build.pk}  hangs #1  RUNNING\n"
    wait_until(
        lambda: StepRun.objects.filter(job__build=build, status="RUNNING").exists(),
        timeout=30,
        message="the step to run",
    )
    result = cictl("cancel", str(build.pk))
    assert (result.code, result.out, result.err) == (0, f"build {build.pk}  CANCELLING\n", "")
    result = cictl("status", str(build.pk), "--wait")
    assert result.code == 1  # it ended, not SUCCEEDED
    assert normalize(result.out) == lines(
        f"build {build.pk}  hangs #1  CANCELED  attempt 1  T",
        "  stage work  CANCELED",
        "    job hang  CANCELED  attempt 1  on AGENT  T  reason: step 'sleeps' ended CANCELED",
        "      step sleeps  CANCELED  exit -15  attempt 1  T",  # SIGTERM
    )
    assert the_build().status == "CANCELED"
    result = cictl("cancel", str(build.pk))
    assert (result.code, result.out) == (3, "")
    assert result.err.startswith("error BUILD_ALREADY_FINISHED: ")


def test_cancel_wait_returns_once_the_build_has_stopped(cictl):
    make_pipeline("hangs", HANGS)
    cictl("trigger", "hangs")
    build = the_build()
    wait_until(
        lambda: StepRun.objects.filter(job__build=build, status="RUNNING").exists(),
        timeout=30,
        message="the step to run",
    )
    result = cictl("cancel", str(build.pk), "--wait", "--json")
    assert (result.code, result.err) == (0, "")
    assert json.loads(result.out)["status"] == "CANCELED"
    assert the_build().status == "CANCELED"


def test_ctrl_c_stops_waiting_and_leaves_the_build_running(cictl):
    make_pipeline("hangs", HANGS)
    waiting = cictl.start("trigger", "hangs", "--wait")
    waiting.wait_for_output("RUNNING\n")
    build = the_build()
    waiting.proc.send_signal(signal.SIGINT)
    result = waiting.result()
    assert result.code == 130
    assert result.err == (
        f"error INTERRUPTED: stopped waiting; build {build.pk} goes on"
        f" (`cictl cancel {build.pk}` stops it)\n"
    )
    assert the_build().status == "RUNNING"
    assert cictl("cancel", str(build.pk), "--wait").code == 0


def test_retry_failed_reruns_the_failed_jobs(cictl):
    make_pipeline("flaky", FLAKY)
    assert cictl("trigger", "flaky", "--wait").code == 1
    build = the_build()
    result = cictl("retry", str(build.pk), "--failed", "--wait")
    assert (result.code, result.err) == (0, ""), result
    assert normalize(result.out) == lines(
        f"build {build.pk}  flaky #1  RUNNING  attempt 2",
        f"build {build.pk}  flaky #1  SUCCEEDED  attempt 2  T",
        "  stage build  SUCCEEDED",
        "    job ok  SUCCEEDED  attempt 1  on AGENT  T",  # kept, not run again
        "      step fine  SUCCEEDED  exit 0  attempt 1  T",
        "    job shaky  SUCCEEDED  attempt 2  on AGENT  T",
        "      step flaky  SUCCEEDED  exit 0  attempt 2  T",
        "  stage after  SUCCEEDED",
        "    job last  SUCCEEDED  attempt 2  on AGENT  T",
        "      step done  SUCCEEDED  exit 0  attempt 1  T",  # its first run: it was skipped
    )
    # Without --failed, every job runs again (failed_only: false).
    result = cictl("retry", str(build.pk), "--json")
    assert (result.code, result.err) == (0, "")
    assert json.loads(result.out)["attempt"] == 3
    build = wait_for_build(build)
    assert (build.status, build.attempt) == ("SUCCEEDED", 3)
    assert set(build.jobs.values_list("attempt", flat=True)) == {2, 3}  # ok too this time


def test_retry_step_by_name_then_wait(cictl):
    make_pipeline("flaky", FLAKY)
    assert cictl("trigger", "flaky", "--wait").code == 1
    build = the_build()
    step = StepRun.objects.get(job__build=build, name="flaky")
    result = cictl("retry-step", str(build.pk), "flaky")
    assert (result.code, result.err) == (0, "")
    assert result.out == f"step {step.pk}  shaky/flaky  PENDING  attempt 2\n"
    result = cictl("status", str(build.pk), "--wait")
    assert result.code == 0
    assert "      step flaky  SUCCEEDED  exit 0  attempt 2  T\n" in normalize(result.out)

    result = cictl("retry-step", str(build.pk), "shaky/flaky")  # it SUCCEEDED now
    assert (result.code, result.out) == (3, "")
    assert result.err.startswith("error STEP_NOT_RETRYABLE: step 'flaky' is SUCCEEDED")
    result = cictl("retry-step", str(build.pk), "nope")
    assert (result.code, result.out) == (3, "")
    assert result.err == (
        f"error STEP_NOT_FOUND: build {build.pk} has no step 'nope' (its steps:"
        " 'ok/fine', 'shaky/flaky', 'last/done')\n"
    )


def test_retry_step_names_one_step(cictl):
    make_pipeline(
        "twins",
        """
stages:
  - name: s
    jobs:
      - {id: a, steps: [{name: check, run: "exit 1"}]}
      - {id: b, steps: [{name: check, run: 'test "$CI_STEP_ATTEMPT" -ge 2'}]}
""",
    )
    assert cictl("trigger", "twins", "--wait").code == 1
    build = the_build()
    result = cictl("retry-step", str(build.pk), "check")
    assert (result.code, result.out) == (3, "")
    assert result.err == (
        f"error STEP_AMBIGUOUS: 'check' names 2 steps of build {build.pk}: 'a/check',"
        " 'b/check'; name one as job/step, or by its id\n"
    )
    step = StepRun.objects.get(job__build=build, job__key="b")
    result = cictl("retry-step", str(build.pk), str(step.pk), "--wait", "--json")
    assert result.code == 1  # a/check still failed
    final = json.loads(result.out)
    assert final["status"] == "FAILED"
    b = final["stages"][0]["jobs"][1]["steps"][0]
    assert (b["id"], b["status"], b["attempt"]) == (step.pk, "SUCCEEDED", 2)


def test_the_live_display_on_a_terminal(cictl):
    make_pipeline("hello", HELLO)
    code, screen = run_in_terminal(cictl, "trigger", "hello", "--wait")
    build = the_build()
    assert code == 0, screen
    # The live tree's last frame stays: the build, its stages, jobs and steps, as they ended.
    final = screen[screen.rindex(f"build {build.pk}") :]
    for text in (
        f"build {build.pk}  hello #1  SUCCEEDED",
        "stage build  SUCCEEDED",
        "job greet  SUCCEEDED",
        "step say  SUCCEEDED  exit 0",
        "step look  SUCCEEDED  exit 0",
    ):
        assert text in final, screen
    assert "RUNNING" not in final


def run_in_terminal(cictl, *args: str, timeout: float = 120) -> tuple[int, str]:
    """cictl with its stdout and stderr on a pseudo-terminal; its exit code and what it
    wrote, with the terminal's escape sequences taken out."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(CICTL), *args],
        env=cictl.env(TERM="xterm-256color", COLUMNS="120", LINES="40"),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        cwd=cictl.home,
    )
    os.close(follower)
    chunks = []

    def read_some() -> bool:
        """Read what is there; True once the terminal is closed (cictl has exited)."""
        ready, _, _ = select.select([leader], [], [], 0.1)
        if not ready:
            return False
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: no writer left
            return True
        chunks.append(data)
        return not data

    try:
        wait_until(read_some, timeout, interval=0, message="cictl to finish on its terminal")
        code = proc.wait(10)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    text = b"".join(chunks).decode("utf-8", "replace")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)
