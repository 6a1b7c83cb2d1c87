"""The YAML of builds from a forge: `on:`, a job's `checkout:` and `schedules:`."""

import pytest

from builds.definition import parse_definition
from builds.errors import InvalidPipeline

JOB = "stages:\n  - name: s\n    jobs:\n      - {id: j, CHECKOUT steps: [{run: 'true'}]}\n"


def spec(head: str = "", checkout: str = "") -> dict:
    return parse_definition(head + JOB.replace("CHECKOUT ", checkout))


def refusal(head: str = "", checkout: str = "") -> str:
    with pytest.raises(InvalidPipeline) as caught:
        spec(head, checkout)
    return caught.value.detail


def test_on_lists_the_events_that_build():
    assert spec()["on"] is None
    assert spec("on: {push: }\n")["on"] == {
        "push": {"branches": None, "tags": None}, "pull_request": None,
    }  # fmt: skip
    given = spec("on: {push: {tags: ['v*']}, pull_request: {branches: [main]}}\n")["on"]
    assert given == {
        "push": {"branches": None, "tags": ["v*"]},
        "pull_request": {"branches": ["main"]},
    }
    assert "on.push.branches[0]" in refusal("on: {push: {branches: ['a b']}}\n")
    assert "on.release: unknown key" in refusal("on: {release: {}}\n")


def test_checkout_by_default_or_as_a_job_says():
    job = lambda s: s["stages"][0]["jobs"][0]["checkout"]  # noqa: E731
    assert job(spec()) == {"depth": None, "submodules": False}
    assert job(spec(checkout="checkout: false, ")) is False
    assert job(spec(checkout="checkout: {depth: 1, submodules: true}, ")) == {
        "depth": 1,
        "submodules": True,
    }
    assert "checkout.depth" in refusal(checkout="checkout: {depth: 0}, ")
    assert "checkout.shallow: unknown key" in refusal(checkout="checkout: {shallow: 1}, ")


def test_schedules_are_checked_when_the_pipeline_is_saved():
    made = spec(
        "variables: {SUITE: quick}\nschedules: [{cron: '0 3 * * *', variables: {SUITE: full}}]\n"
    )
    assert made["schedules"] == [
        {"cron": "0 3 * * *", "timezone": "UTC", "branch": None, "variables": {"SUITE": "full"}}
    ]
    assert "schedules[0]" in refusal("schedules: [{cron: '61 * * * *'}]\n")
    assert "not an IANA time zone" in refusal("schedules: [{cron: '@daily', timezone: Nowhere}]\n")
    assert refusal("schedules: [{cron: '@daily', variables: {X: y}}]\n").startswith(
        "schedules[0].variables.X"
    )
    many = "schedules: [" + ", ".join(["{cron: '@daily'}"] * 21) + "]\n"
    assert "schedules" in refusal(many)
