"""The YAML of builds from a forge: `on:`, a job's `checkout:` and `schedules:`."""

import pytest

from builds.definition import MAX_SCHEDULES, parse_definition
from builds.errors import InvalidPipeline

# One job; CHECKOUT is replaced with the job's `checkout:` entry, if any.
JOB = "stages:\n  - name: s\n    jobs:\n      - {id: j, CHECKOUT steps: [{run: 'true'}]}\n"


def spec(head: str = "", checkout: str = "") -> dict:
    return parse_definition(head + JOB.replace("CHECKOUT ", checkout))


def refusal(head: str = "", checkout: str = "") -> str:
    with pytest.raises(InvalidPipeline) as caught:
        spec(head, checkout)
    return caught.value.detail


def checkout_of(checkout: str) -> dict | bool:
    return spec(checkout=checkout)["stages"][0]["jobs"][0]["checkout"]


# -- on: ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "on"),
    [
        ("", None),
        ("on:\n", None),
        # `push:` with nothing under it: every push (branches and tags), no pull request.
        ("on: {push: }\n", {"push": {"branches": None, "tags": None}, "pull_request": None}),
        ("on:\n  push:\n", {"push": {"branches": None, "tags": None}, "pull_request": None}),
        ("on: {pull_request: }\n", {"push": None, "pull_request": {"branches": None}}),
        (
            "on: {push: {branches: [main, 'release/*'], tags: ['v*']}}\n",
            {"push": {"branches": ["main", "release/*"], "tags": ["v*"]}, "pull_request": None},
        ),
        (
            "on: {push: {tags: ['v*']}, pull_request: {branches: [main]}}\n",
            {"push": {"branches": None, "tags": ["v*"]}, "pull_request": {"branches": ["main"]}},
        ),
        (
            "on:\n  push:\n    branches: ['**']\n  pull_request:\n    branches: [main]\n",
            {"push": {"branches": ["**"], "tags": None}, "pull_request": {"branches": ["main"]}},
        ),
    ],
)
def test_on_is_normalized(head, on):
    assert spec(head)["on"] == on


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        ("on: {release: {}}\n", "on.release: unknown key"),
        # An empty `on:` would build nothing from the forge, silently: refused.
        ("on: {}\n", "on: lists no event"),
        ("on: {push: {branch: [main]}}\n", "on.push.branch: unknown key"),
        ("on: {pull_request: {tags: [v1]}}\n", "on.pull_request.tags: unknown key"),
        ("on: {push: {branches: ['a b']}}\n", "on.push.branches[0]: String should match pattern"),
        ("on: {push: {tags: [v1, 'v\t2']}}\n", "on.push.tags[1]: String should match pattern"),
        (
            "on: {pull_request: {branches: [' main']}}\n",
            "on.pull_request.branches[0]: String should match pattern",
        ),
        ("on: {push: {branches: ['']}}\n", "on.push.branches[0]: String should"),
        ("on: {push: {branches: []}}\n", "on.push.branches: List should have at least 1 item"),
        ("on: {push: {branches: main}}\n", "on.push.branches: Input should be a valid list"),
        ("on: push\n", "on: Input should be a valid dictionary"),
        (
            "on: {push: {branches: ['" + "a" * 256 + "']}}\n",
            "on.push.branches[0]: String should have at most 255 characters",
        ),
        (
            "on: {push: {branches: [" + ", ".join(["a"] * 51) + "]}}\n",
            "on.push.branches: List should have at most 50 items",
        ),
    ],
)
def test_bad_on_is_refused_with_the_place(head, detail):
    assert refusal(head).startswith(detail)


# -- checkout: ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checkout", "normalized"),
    [
        ("", {"depth": None, "submodules": False}),
        ("checkout: {}, ", {"depth": None, "submodules": False}),
        ("checkout: false, ", False),
        ("checkout: {depth: 1, submodules: true}, ", {"depth": 1, "submodules": True}),
        ("checkout: {depth: '50'}, ", {"depth": 50, "submodules": False}),
        ("checkout: {submodules: false}, ", {"depth": None, "submodules": False}),
    ],
)
def test_checkout_by_default_or_as_a_job_says(checkout, normalized):
    assert checkout_of(checkout) == normalized


@pytest.mark.parametrize(
    ("checkout", "detail"),
    [
        ("checkout: {depth: 0}, ", "stages[0].jobs[0].checkout.depth: Input should be greater"),
        ("checkout: {depth: -1}, ", "stages[0].jobs[0].checkout.depth: Input should be greater"),
        ("checkout: {depth: 1000001}, ", "stages[0].jobs[0].checkout.depth: Input should be less"),
        ("checkout: {depth: all}, ", "stages[0].jobs[0].checkout.depth: Input should be"),
        ("checkout: {shallow: 1}, ", "stages[0].jobs[0].checkout.shallow: unknown key"),
        ("checkout: {submodules: maybe}, ", "stages[0].jobs[0].checkout.submodules: Input"),
        ("checkout: 3, ", "stages[0].jobs[0].checkout: a mapping (depth, submodules), or false"),
    ],
)
def test_bad_checkout_is_refused_with_the_place(checkout, detail):
    assert refusal(checkout=checkout).startswith(detail)


def test_checkout_is_per_job():
    text = (
        "stages:\n  - name: s\n    jobs:\n"
        "      - {id: a, checkout: false, steps: [{run: 'true'}]}\n"
        "      - {id: b, checkout: {depth: 3}, steps: [{run: 'true'}]}\n"
        "      - {id: c, steps: [{run: 'true'}]}\n"
    )
    jobs = parse_definition(text)["stages"][0]["jobs"]
    assert [job["checkout"] for job in jobs] == [
        False,
        {"depth": 3, "submodules": False},
        {"depth": None, "submodules": False},
    ]


# -- schedules: ---------------------------------------------------------------------------


def test_schedules_are_normalized_with_their_defaults():
    assert spec()["schedules"] == []
    made = spec(
        "variables: {SUITE: quick, N: 1}\n"
        "schedules:\n"
        "  - {cron: '0 3 * * *', variables: {SUITE: full}}\n"
        "  - {cron: '@daily', timezone: Europe/Berlin, branch: release/1.0, variables: {N: 2}}\n"
    )
    assert made["schedules"] == [
        {"cron": "0 3 * * *", "timezone": "UTC", "branch": None, "variables": {"SUITE": "full"}},
        {
            "cron": "@daily",
            "timezone": "Europe/Berlin",
            "branch": "release/1.0",
            "variables": {"N": "2"},
        },
    ]


def test_schedule_variables_may_set_parameters():
    made = spec(
        "parameters: {SUITE: {choices: [quick, full], default: quick}}\n"
        "schedules: [{cron: '0 3 * * *', variables: {SUITE: full}}]\n"
    )
    assert made["schedules"][0]["variables"] == {"SUITE": "full"}


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        ("schedules: [{cron: '61 * * * *'}]\n", "schedules[0]: cron: '61 * * * *' is not a cron"),
        ("schedules: [{cron: '0 0 * * * *'}]\n", "schedules[0]: cron: '0 0 * * * *' is not a"),
        ("schedules: [{cron: '@reboot'}]\n", "schedules[0]: cron: '@reboot' is not a cron"),
        ("schedules: [{cron: garbage}]\n", "schedules[0]: cron: 'garbage' is not a cron"),
        ("schedules: [{cron: ''}]\n", "schedules[0].cron: String should have at least 1"),
        ("schedules: [{cron: '" + "* " * 500 + "'}]\n", "schedules[0].cron: String should have"),
        (
            "schedules: [{cron: '@daily'}, {cron: '@daily', timezone: Nowhere}]\n",
            "schedules[1]: timezone: 'Nowhere' is not an IANA time zone",
        ),
        ("schedules: [{timezone: UTC}]\n", "schedules[0].cron: required"),
        ("schedules: [{cron: '@daily', when: x}]\n", "schedules[0].when: unknown key"),
        ("schedules: [{cron: '@daily', branch: ''}]\n", "schedules[0].branch: String should"),
        ("schedules: {cron: '@daily'}\n", "schedules: Input should be a valid list"),
        (
            "schedules: [" + ", ".join(["{cron: '@daily'}"] * (MAX_SCHEDULES + 1)) + "]\n",
            f"schedules: List should have at most {MAX_SCHEDULES} items",
        ),
    ],
)
def test_bad_schedules_are_refused_with_the_place(head, detail):
    assert refusal(head).startswith(detail)


def test_as_many_schedules_as_allowed_are_taken():
    many = "schedules: [" + ", ".join(["{cron: '@daily'}"] * MAX_SCHEDULES) + "]\n"
    assert len(spec(many)["schedules"]) == MAX_SCHEDULES


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        (
            "schedules: [{cron: '@daily', variables: {X: y}}]\n",
            "schedules[0].variables.X: not a variable of this pipeline",
        ),
        (
            "variables: {A: b}\n"
            "schedules: [{cron: '@daily'}, {cron: '@daily', variables: {X: y}}]\n",
            "schedules[1].variables.X: not a variable of this pipeline",
        ),
        (
            "parameters: {SUITE: {choices: [quick, full]}}\n"
            "schedules: [{cron: '@daily', variables: {SUITE: nope}}]\n",
            "schedules[0].variables.SUITE: 'nope' is not one of its choices",
        ),
        (
            "parameters: {SUITE: {required: true}}\nschedules: [{cron: '@daily'}]\n",
            "schedules[0].variables.SUITE: required, and not given",
        ),
    ],
)
def test_schedule_variables_are_checked_as_a_triggers(head, detail):
    assert refusal(head).startswith(detail)


def test_a_schedule_may_not_set_a_reserved_name():
    detail = refusal("schedules: [{cron: '@daily', variables: {CI_EVENT: push}}]\n")
    assert detail.startswith("schedules[0].variables.CI_EVENT: reserved (")
