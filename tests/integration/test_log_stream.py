"""Streamed step logs (`GET .../log/?follow=1`, Server-Sent Events) from the live web, as
deploy/Procfile runs it, while real agents run the steps: each chunk an event with its id,
resumed after a Last-Event-ID, ended by an event carrying the attempt's final status; the
API's authentication, permission and 404 hold for the stream as for the plain log."""

import concurrent.futures
import json

import httpx
import pytest
from httpx_sse import connect_sse

from builds import services
from builds.models import StepRun
from tests.support import api_token, make_pipeline, user_with, wait_for_build, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]

# Lines a while apart: the stream is followed while the step runs.
SLOW = """
stages:
  - name: s
    jobs:
      - id: j
        runs-on: default
        steps:
          - name: talk
            run: for i in 1 2 3 4 5 6; do echo "line $i"; sleep 0.4; done
          - name: after
            run: echo done
"""


def token_of(*perms: str) -> str:
    return api_token(user_with(*perms))


def url_of(server: str, step: StepRun) -> str:
    return f"{server}/api/builds/{step.job.build_id}/steps/{step.pk}/log/"


def first_step(build) -> StepRun:
    return StepRun.objects.select_related("job").get(job__build=build, name="talk")


def events(url: str, token: str, last_id: str | None = None, stop_after: int | None = None):
    """The stream's events as (kind, id, data), until its end (or `stop_after` log events)."""
    headers = {"Authorization": f"Token {token}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    seen = []
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(client, "GET", url, params={"follow": 1}, headers=headers) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            seen.append((sse.event, sse.id, json.loads(sse.data)))
            if sse.event == "end":
                break
            if stop_after is not None and len(seen) >= stop_after:
                break
    return seen


def text_of(seen) -> str:
    return "".join(data["text"] for kind, _, data in seen if kind == "log")


def test_a_running_steps_log_streams_to_its_end(worker_env):
    server = worker_env["AGENT_SERVER_URL"]
    token = token_of("builds.view_build")
    build = services.trigger_build(make_pipeline("streamed", SLOW))
    step = first_step(build)
    wait_until(lambda: StepRun.objects.get(pk=step.pk).started_at, timeout=30)
    seen = events(url_of(server, step), token)
    assert seen[-1][0] == "end"
    assert seen[-1][2] == {"status": "SUCCEEDED", "attempt": 1}
    logs = [event for event in seen if event[0] == "log"]
    assert len(logs) >= 2  # the lines came while it ran, not in one piece at its end
    ids = [int(event_id) for _, event_id, _ in logs]
    assert ids == sorted(set(ids))
    text = text_of(seen)
    assert [line for line in text.splitlines() if line.startswith("line")] == [
        f"line {n}" for n in range(1, 7)
    ]
    assert text == services.step_log(StepRun.objects.get(pk=step.pk))  # the table's truth
    assert wait_for_build(build).status == "SUCCEEDED"


def test_a_stream_resumes_after_its_last_event_id(worker_env):
    server = worker_env["AGENT_SERVER_URL"]
    token = token_of("builds.view_build")
    build = services.trigger_build(make_pipeline("resumed", SLOW))
    step = first_step(build)
    url = url_of(server, step)
    wait_until(lambda: StepRun.objects.get(pk=step.pk).started_at, timeout=30)
    first = events(url, token, stop_after=1)
    assert [kind for kind, _, _ in first] == ["log"]
    rest = events(url, token, last_id=first[-1][1])
    assert rest[-1][0] == "end"
    assert all(int(event_id) > int(first[-1][1]) for kind, event_id, _ in rest if kind == "log")
    assert text_of(first) + text_of(rest) == services.step_log(StepRun.objects.get(pk=step.pk))

    # After the end: the whole log again from the table, at once, then the end.
    again = events(url, token)
    assert text_of(again) == text_of(first) + text_of(rest)
    assert (again[-1][0], again[-1][2]) == ("end", {"status": "SUCCEEDED", "attempt": 1})


def test_many_followers_of_one_step_each_get_all_of_it(worker_env):
    server = worker_env["AGENT_SERVER_URL"]
    token = token_of("builds.view_build")
    build = services.trigger_build(make_pipeline("crowd", SLOW))
    step = first_step(build)
    url = url_of(server, step)
    wait_until(lambda: StepRun.objects.get(pk=step.pk).started_at, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: events(url, token), range(20)))
    expected = services.step_log(StepRun.objects.get(pk=step.pk))
    assert all(text_of(seen) == expected and seen[-1][0] == "end" for seen in results)


def test_the_stream_answers_as_the_log_does_to_who_may_not_read(worker_env):
    server = worker_env["AGENT_SERVER_URL"]
    build = services.trigger_build(make_pipeline("guarded-stream", SLOW))
    step = first_step(build)
    url = url_of(server, step)
    nobody = token_of()  # a user who sees nothing of the pipeline
    viewer = token_of("builds.view_pipeline")  # sees it, may not read its builds' logs
    for headers, expected in (
        ({}, 401),
        ({"Authorization": f"Token {nobody}"}, 404),
        ({"Authorization": f"Token {viewer}"}, 403),
        ({"Authorization": "Token not-a-token"}, 401),
    ):
        answer = httpx.get(url, params={"follow": 1}, headers=headers, timeout=10)
        assert answer.status_code == expected, answer.text
        assert answer.headers["content-type"].startswith("application/json")
        plain = httpx.get(url, headers=headers, timeout=10)
        assert (plain.status_code, plain.json()) == (answer.status_code, answer.json())
    reader = {"Authorization": f"Token {token_of('builds.view_build')}"}
    missing = f"{server}/api/builds/{build.pk}/steps/{step.pk + 10_000}/log/"
    answer = httpx.get(missing, params={"follow": 1}, headers=reader, timeout=10)
    assert answer.status_code == 404
    wait_for_build(build)


def test_a_web_process_without_streams_says_so(admin_client):
    """The WSGI application alone (ciproject.wsgi, the Django test client) cannot stream."""
    build = services.trigger_build(make_pipeline("wsgi-only", SLOW))
    step = first_step(build)
    answer = admin_client.get(f"/api/builds/{build.pk}/steps/{step.pk}/log/", {"follow": 1})
    assert answer.status_code == 406
    assert answer.json()["code"] == "LOG_STREAM_UNAVAILABLE"
    wait_for_build(build)
