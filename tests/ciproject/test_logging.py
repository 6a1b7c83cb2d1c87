"""Structured logs: the JSON formatter, the ids a line carries (from log_context, or from the
log call's `extra`), the settings that wire them, and a real agent logging in JSON."""

import io
import json
import logging
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agents import services as agents
from agents.process.agent import AgentProcess
from builds import services
from builds.models import JobRun
from ciproject.log_format import ContextFilter, JsonFormatter, PlainFormatter, log_context
from tests.processes import ROOT, Workers
from tests.support import make_pipeline, one_step, wait_for_build, wait_until

log = logging.getLogger("tests.logging")
IDS = ("build_id", "job_id", "attempt", "step_id", "step_attempt")


@pytest.fixture
def lines():
    """Lines logged to the root logger meanwhile, through a handler made as settings.LOGGING
    makes it for LOG_FORMAT=json, parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def ids_of(line: dict) -> dict:
    return {k: line[k] for k in IDS if k in line}


def test_a_line_is_one_json_object_with_its_fields(lines):
    log.warning("two\nlines, %s and ünïcode", "args")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("it failed")
    first, second = lines()  # the newline in the message did not split the line
    assert first["message"] == "two\nlines, args and ünïcode"
    assert (first["level"], first["logger"]) == ("WARNING", "tests.logging")
    assert (first["pid"], first["process"]) == (os.getpid(), "MainProcess")
    assert first["thread"] == threading.current_thread().name
    moment = datetime.fromisoformat(first["time"])
    assert first["time"].endswith("Z")
    assert moment.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 60
    assert "exception" not in first
    assert not ids_of(first)
    assert second["level"] == "ERROR"
    assert second["exception"].startswith("Traceback (most recent call last)")
    assert second["exception"].endswith("ZeroDivisionError: division by zero")


def test_lines_inside_log_context_carry_its_ids_and_lose_them_after(lines):
    with log_context(build_id=12, job_id=40, attempt=1):
        log.info("job")
        with log_context(step_id=7, step_attempt=2):
            log.info("step")
        log.info("job again")
    log.info("outside")
    assert [(line["message"], ids_of(line)) for line in lines()] == [
        ("job", {"build_id": 12, "job_id": 40, "attempt": 1}),
        ("step", {"build_id": 12, "job_id": 40, "attempt": 1, "step_id": 7, "step_attempt": 2}),
        ("job again", {"build_id": 12, "job_id": 40, "attempt": 1}),
        ("outside", {}),
    ]


def test_ids_not_known_yet_are_left_out_and_unknown_names_refused(lines):
    with log_context(build_id=None, job_id=3):
        log.info("no build yet")
    assert ids_of(lines()[0]) == {"job_id": 3}
    with pytest.raises(TypeError, match="build"), log_context(build=1):
        pass


def test_the_context_is_the_threads_own(lines):
    """Agents run jobs side by side in the threads of one process."""
    both_inside = threading.Barrier(2)

    def run(job_id):
        with log_context(job_id=job_id):
            both_inside.wait(timeout=10)
            log.info("job %s", job_id)
            both_inside.wait(timeout=10)

    threads = [threading.Thread(target=run, args=(job_id,)) for job_id in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.info("main")
    got = {line["message"]: ids_of(line) for line in lines()}
    assert got == {"job 1": {"job_id": 1}, "job 2": {"job_id": 2}, "main": {}}


def test_ids_from_extra_win_and_merge_with_the_context(lines):
    log.info("extra only", extra={"build_id": 5})
    with log_context(build_id=1, job_id=2, attempt=1):
        log.info("a step of this job", extra={"step_id": 9})
        log.info("this job's next attempt", extra={"job_id": 2, "attempt": 2})
        log.info("another job of the build", extra={"job_id": 8})
        log.info("another build", extra={"build_id": 6})
    assert [(line["message"], ids_of(line)) for line in lines()] == [
        ("extra only", {"build_id": 5}),
        ("a step of this job", {"build_id": 1, "job_id": 2, "attempt": 1, "step_id": 9}),
        ("this job's next attempt", {"build_id": 1, "job_id": 2, "attempt": 2}),
        # The context's attempt (and steps) belong to its own job, its job to its own build.
        ("another job of the build", {"build_id": 1, "job_id": 8}),
        ("another build", {"build_id": 6}),
    ]


def test_plain_lines_show_the_ids_briefly():
    formatter = PlainFormatter("%(levelname)s %(name)s %(id_label)s%(message)s")

    def line(**extra):
        record = log.makeRecord(log.name, logging.INFO, __file__, 1, "hello", (), None, extra=extra)
        ContextFilter().filter(record)
        return formatter.format(record)

    assert line() == "INFO tests.logging hello"
    with log_context(build_id=12, job_id=40, attempt=1):
        assert line() == "INFO tests.logging [build 12 job 40/1] hello"
        assert line(step_id=7, step_attempt=2) == (
            "INFO tests.logging [build 12 job 40/1 step 7/2] hello"
        )


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """A fresh process configured by settings.py from `env` (a None value: unset)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "ciproject.settings", **env}
    return subprocess.run(
        [sys.executable, "-c", f"import django\ndjango.setup()\n{code}"],
        cwd=ROOT,
        env={name: value for name, value in env.items() if value is not None},
        capture_output=True,
        text=True,
        timeout=60,
    )


LOG_SOME = """
import logging
from ciproject.log_format import log_context
with log_context(build_id=3, job_id=4, attempt=1):
    logging.getLogger("builds").info("in a job")
    logging.getLogger("django.request").warning("django's own")
"""


def test_settings_log_format_json_makes_every_line_json():
    # DEBUG: Django's own console handler would also print django.* lines, as plain text.
    done = run_python(LOG_SOME, LOG_FORMAT="json", DEBUG="true")
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["message"], ids_of(line)) for line in got] == [
        ("builds", "in a job", {"build_id": 3, "job_id": 4, "attempt": 1}),
        ("django.request", "django's own", {"build_id": 3, "job_id": 4, "attempt": 1}),
    ]


def test_settings_plain_by_default_and_a_bad_log_format_refused():
    done = run_python(LOG_SOME, LOG_FORMAT=None)
    assert done.returncode == 0, done.stderr
    assert " INFO builds [build 3 job 4/1] in a job\n" in done.stderr
    done = run_python("", LOG_FORMAT="xml")
    assert done.returncode != 0
    assert "LOG_FORMAT='xml': use plain or json" in done.stderr


@pytest.mark.django_db
def test_an_agent_logs_a_job_with_its_ids(lines, settings, tmp_path):
    settings.AGENT_WORKSPACE_ROOT = str(tmp_path)
    agents.register_agent("a1", "host", ["unit-tests"], 1, "1")
    pipeline = make_pipeline("logged", one_step("echo hi", runs_on="unit-tests"))
    build = services.trigger_build(pipeline)
    job = JobRun.objects.get(build=build)
    step = job.steps.get()
    assert AgentProcess("a1", ["unit-tests"]).run_job(job.pk, 1) == "SUCCEEDED"
    assert services.advance_build(build.pk) == "SUCCEEDED"
    job_ids = {"build_id": build.pk, "job_id": job.pk, "attempt": 1}
    step_ids = {**job_ids, "step_id": step.pk, "step_attempt": 1}
    got = [(line["message"], ids_of(line)) for line in lines()]
    assert got == [
        (f"job {job.pk} attempt 1: running on a1", job_ids),
        (f"step {step.pk} attempt 1: ended SUCCEEDED", step_ids),
        (f"job {job.pk} attempt 1: ended SUCCEEDED", job_ids),
        (f"build {build.number} of {pipeline.pk} ended SUCCEEDED", {"build_id": build.pk}),
    ]


@pytest.fixture
def json_agent(workers, worker_env, tmp_path):
    """An agent of the test's own, logging in JSON to its own file."""
    agent = Workers({**worker_env, "LOG_FORMAT": "json"}, tmp_path)
    agent.start_agent("agent-json", "json-logs")
    try:
        agent.wait_ready(["agent-json"])
        yield tmp_path / "agent-json.log"
    finally:
        agent.stop_all()


def complete_lines(path: Path) -> list[str]:
    text = path.read_text()
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]


@pytest.mark.django_db(transaction=True)
def test_a_real_agent_logs_one_json_object_a_line_with_the_jobs_ids(json_agent):
    pipeline = make_pipeline("json-logs", one_step("echo hi", runs_on="json-logs"))
    build = wait_for_build(services.trigger_build(pipeline))
    assert build.status == "SUCCEEDED"
    job = JobRun.objects.get(build=build)
    step = job.steps.get()
    ended = f"job {job.pk} attempt 1: ended SUCCEEDED"
    # Read while the agent runs: at shutdown Celery writes one line of its own (not JSON).
    wait_until(
        lambda: any(ended in line for line in complete_lines(json_agent)),
        timeout=20,
        message=f"{ended!r} in {json_agent}",
    )
    got = []
    for text in complete_lines(json_agent):
        line = json.loads(text)  # every line is one JSON object
        assert isinstance(line, dict), text
        assert {"time", "level", "logger", "message", "process", "pid"} <= line.keys(), text
        got.append(line)
    job_ids = {"build_id": build.pk, "job_id": job.pk, "attempt": 1}
    about_the_job = [line for line in got if line.get("job_id") == job.pk]
    assert [line["message"] for line in about_the_job] == [
        f"job {job.pk} attempt 1: running on agent-json",
        f"step {step.pk} attempt 1: ended SUCCEEDED",
        ended,
    ]
    assert all(ids_of(line).items() >= job_ids.items() for line in about_the_job)
    assert ids_of(about_the_job[1]) == {**job_ids, "step_id": step.pk, "step_attempt": 1}
    # Celery's own lines come through the same handler.
    received = f"Task agents.tasks.run_job[job-{job.pk}-1] received"
    assert any(line["logger"].startswith("celery") and line["message"] == received for line in got)
    assert any(
        line["message"].startswith("agent-json@") and "ready" in line["message"] for line in got
    )
