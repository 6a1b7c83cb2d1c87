"""cictl logs: the steps' logs of a finished build, and --follow, which streams them (the
server's Server-Sent Events) while the build runs, waiting for steps not started yet."""

import json
import re

import pytest

from builds.models import Build, StepRun
from tests.cictl.conftest import normalize
from tests.support import make_pipeline, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

TWO_STAGES = """
stages:
  - name: build
    jobs:
      - id: greet
        steps:
          - {name: say, run: 'echo "hi world"'}
          - {name: count, run: 'printf "1\\n2\\n3\\n"'}
  - name: test
    jobs:
      - id: check
        steps:
          - {name: fails, run: "echo bad; exit 3"}
          - {name: never, run: echo never}
"""


def test_logs_of_a_finished_build(cictl):
    make_pipeline("logged", TWO_STAGES)
    assert cictl("trigger", "logged", "--wait").code == 1
    build = Build.objects.get()
    result = cictl("logs", str(build.pk))
    assert (result.code, result.err) == (0, "")
    # In order (stage, job, step), each headed by its job/step; the skipped step has none.
    assert normalize(result.out) == (
        "==> greet/say\n"
        "hi world\n"
        "[ciproject] exit code 0 after T\n"
        "==> greet/count\n"
        "1\n2\n3\n"
        "[ciproject] exit code 0 after T\n"
        "==> check/fails\n"
        "bad\n"
        "[ciproject] exit code 3 after T\n"
    )
    by_name = cictl("logs", str(build.pk), "--step", "say")
    by_path = cictl("logs", str(build.pk), "--step", "greet/say")
    step = StepRun.objects.get(name="say")
    by_id = cictl("logs", str(build.pk), "--step", str(step.pk))
    assert normalize(by_name.out) == "==> greet/say\nhi world\n[ciproject] exit code 0 after T\n"
    assert by_name.code == by_path.code == by_id.code == 0
    assert by_name.out == by_path.out == by_id.out

    result = cictl("logs", str(build.pk), "--json")
    assert (result.code, result.err) == (0, "")
    entries = [json.loads(line) for line in result.out.splitlines()]
    assert [(e["event"], e["job"], e["step"], e["attempt"], e["status"]) for e in entries] == [
        ("log", "greet", "say", 1, "SUCCEEDED"),
        ("log", "greet", "count", 1, "SUCCEEDED"),
        ("log", "check", "fails", 1, "FAILED"),
    ]
    assert entries[0]["step_id"] == step.pk
    assert normalize(entries[1]["text"]) == "1\n2\n3\n[ciproject] exit code 0 after T\n"

    result = cictl("logs", str(build.pk), "--step", "nope")
    assert (result.code, result.out) == (3, "")
    assert result.err.startswith(f"error STEP_NOT_FOUND: build {build.pk} has no step 'nope'")
    result = cictl("logs", str(build.pk), "--attempt", "2")
    assert (result.code, result.out) == (0, "")  # no step ran twice


def test_logs_follow_streams_a_running_build_step_after_step(cictl, tmp_path):
    gate = tmp_path / "gate"
    make_pipeline(
        "followed",
        f"""
stages:
  - name: first
    jobs:
      - id: a
        steps:
          - name: gated
            run: |
              echo one
              while [ ! -e {gate} ]; do sleep 0.05; done
              echo two
  - name: second
    jobs:
      - {{id: b, steps: [{{name: last, run: echo three}}]}}
""",
    )
    assert cictl("trigger", "followed").code == 0
    build = Build.objects.get()
    follower = cictl.start("logs", str(build.pk), "--follow")
    # The first line arrives while its step still runs, and the next stage has not started.
    follower.wait_for_output("one\n")
    assert "two" not in follower.out
    assert StepRun.objects.get(name="last").status == "PENDING"
    gate.touch()
    result = follower.result()
    assert (result.code, result.err) == (0, "")
    assert normalize(result.out) == (
        "==> a/gated\n"
        "one\n"
        "two\n"
        "[ciproject] exit code 0 after T\n"
        "==> b/last\n"
        "three\n"
        "[ciproject] exit code 0 after T\n"
    )
    assert Build.objects.get().status == "SUCCEEDED"

    # Of the finished build, --json: each chunk with its seq, each attempt's end, the build.
    result = cictl("-v", "logs", str(build.pk), "--follow", "--json")
    assert result.code == 0
    # -v: the streams were Server-Sent Events, from the start (no Last-Event-ID).
    assert result.err.count("  200 text/event-stream\n") == 2, result.err
    assert "from event" not in result.err
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[-1] == {"event": "build", "id": build.pk, "status": "SUCCEEDED"}
    ends = [(e["job"], e["step"], e["attempt"], e["status"]) for e in events if e["event"] == "end"]
    assert ends == [("a", "gated", 1, "SUCCEEDED"), ("b", "last", 1, "SUCCEEDED")]
    chunks = [e for e in events if e["event"] == "log"]
    assert normalize("".join(e["text"] for e in chunks)) == (
        "one\ntwo\n[ciproject] exit code 0 after T\nthree\n[ciproject] exit code 0 after T\n"
    )
    for step in ("gated", "last"):
        seqs = [e["seq"] for e in chunks if e["step"] == step]
        assert seqs == sorted(set(seqs)), chunks  # increasing


GATED = """
stages:
  - name: first
    jobs:
      - id: a
        steps:
          - name: gated
            run: |
              echo one
              while [ ! -e {gate} ]; do sleep 0.05; done
              echo two
"""


def test_logs_follow_resumes_after_the_server_restarts(cictl, workers, tmp_path):
    """web stops while a follower streams (its streams are closed): the follower reconnects
    once web is back, with Last-Event-ID, and gets the rest, nothing twice."""
    gate = tmp_path / "gate"
    make_pipeline("followed", GATED.format(gate=gate))
    assert cictl("trigger", "followed").code == 0
    build = Build.objects.get()
    follower = cictl.start("-v", "logs", str(build.pk), "--follow")
    follower.wait_for_output("one\n")
    workers.stop("web")
    workers.start_web()
    workers.wait_web()
    gate.touch()
    result = follower.result()
    assert result.code == 0, result.err
    assert normalize(result.out) == "==> a/gated\none\ntwo\n[ciproject] exit code 0 after T\n"
    assert re.search(r"a/gated: .*; resuming after event \d+ in", result.err), result.err
    assert re.search(r"\(stream, from event \d+\)\ncictl:   200 text/event-stream\n", result.err)


def test_logs_follow_of_a_failed_build_exits_1(cictl):
    make_pipeline("logged", TWO_STAGES)
    assert cictl("trigger", "logged", "--wait").code == 1
    build = Build.objects.get()
    plain = cictl("logs", str(build.pk))
    result = cictl("logs", str(build.pk), "--follow")
    assert (result.code, result.err) == (1, "")
    assert result.out == plain.out


def test_logs_follow_waits_for_a_queued_build(cictl, tmp_path):
    """A build whose job waits for an agent: the follower waits too, then streams it."""
    gate = tmp_path / "gate"
    make_pipeline(
        "blocker",
        f"""
stages:
  - name: s
    jobs:
      - id: hold
        runs-on: big
        steps: [{{name: wait, run: 'while [ ! -e {gate} ]; do sleep 0.05; done'}}]
""",
    )
    make_pipeline(
        "queued",
        """
stages:
  - name: s
    jobs:
      - {id: after, runs-on: big, steps: [{name: say, run: echo finally}]}
""",
    )
    assert cictl("trigger", "blocker").code == 0  # agent-2, the only "big" one, is taken
    blocker = Build.objects.get(pipeline__name="blocker")
    wait_until(
        lambda: StepRun.objects.filter(job__build=blocker, status="RUNNING").exists(),
        timeout=30,
        message="the blocking step to run",
    )
    assert cictl("trigger", "queued").code == 0
    build = Build.objects.get(pipeline__name="queued")
    follower = cictl.start("logs", str(build.pk), "--follow")
    assert follower.out == ""  # its step cannot have started: nothing to show yet
    gate.touch()
    result = follower.result()
    assert (result.code, result.err) == (0, "")
    assert normalize(result.out) == "==> after/say\nfinally\n[ciproject] exit code 0 after T\n"
