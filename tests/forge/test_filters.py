"""`on:` filters (forge.filters): the globs, and which events a pipeline's `on:` builds."""

import pytest

from builds.source import Event, Source
from forge.filters import glob_matches, refusal

SHA = "a" * 40
URL = "https://forge.example/o/r.git"


def push(branch: str) -> Source:
    return Source(Event.PUSH, SHA, f"refs/heads/{branch}", URL, branch=branch)


def tag(name: str) -> Source:
    return Source(Event.TAG, SHA, f"refs/tags/{name}", URL, tag=name)


def pull_request(target: str, source_branch: str = "feature/x") -> Source:
    return Source(
        Event.PULL_REQUEST,
        SHA,
        "refs/pull/7/head",
        URL,
        branch=source_branch,
        target_branch=target,
        pull_request=7,
    )


def on(push_filter: dict | None = None, pull_request_filter: dict | None = None) -> dict:
    """`on:` as builds.definition normalizes it."""
    return {"push": push_filter, "pull_request": pull_request_filter}


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("main", "main", True),
        ("main", "main2", False),
        ("main", "xmain", False),  # the whole name, not a part of it
        ("release/*", "release/1.0", True),
        ("release/*", "release/1.0/hotfix", False),  # `*` does not cross `/`
        ("*", "feature/x", False),
        ("*", "feature", True),
        ("release/**", "release/1.0/hotfix", True),  # `**` does
        ("**", "feature/a/b", True),
        ("feature/**/fix", "feature/a/b/fix", True),
        ("v?", "v1", True),  # `?` is one character
        ("v?", "v", False),
        ("v?", "v12", False),
        ("a?b", "a/b", False),  # and not `/`
        ("v*.*", "v1.2", True),
        # Everything else stands for itself, regex characters included.
        ("release/1.0", "release/1.0", True),
        ("release/1.0", "release/1x0", False),
        ("a+b", "a+b", True),
        ("a+b", "aab", False),
        ("(x)|y", "y", False),
        ("^main$", "main", False),
        ("[ab]", "a", False),
        ("[ab]", "[ab]", True),
    ],
)
def test_glob_matches(pattern, name, matches):
    assert glob_matches(pattern, name) is matches


def test_without_on_every_push_tag_and_pull_request_builds():
    for source in (push("main"), push("feature/x"), tag("v1"), pull_request("main")):
        assert refusal(None, source) is None


def test_push_with_nothing_under_it_builds_every_push_and_tag_but_no_pull_request():
    every_push = on({"branches": None, "tags": None})
    assert refusal(every_push, push("anything/at/all")) is None
    assert refusal(every_push, tag("v9")) is None
    assert refusal(every_push, pull_request("main")) == "`on:` lists no pull_request"


def test_only_branches_listed_builds_those_branches_and_no_tags():
    branches = on({"branches": ["main", "release/*"], "tags": None})
    assert refusal(branches, push("main")) is None
    assert refusal(branches, push("release/2.0")) is None
    assert refusal(branches, push("release/2.0/rc")) == (
        "branch 'release/2.0/rc' matches no on.push.branches"
    )
    assert refusal(branches, push("feature/x")) == "branch 'feature/x' matches no on.push.branches"
    # A tag named like a listed branch is still a tag: only branches were asked for.
    assert refusal(branches, tag("main")) == "on.push lists branches only, no tags"


def test_only_tags_listed_builds_those_tags_and_no_branches():
    tags = on({"branches": None, "tags": ["v*"]})
    assert refusal(tags, tag("v1.2.3")) is None
    assert refusal(tags, tag("nightly")) == "tag 'nightly' matches no on.push.tags"
    assert refusal(tags, push("v1")) == "on.push lists tags only, no branches"


def test_branches_and_tags_listed_build_both():
    both = on({"branches": ["main"], "tags": ["v*"]})
    assert refusal(both, push("main")) is None
    assert refusal(both, tag("v1")) is None
    assert refusal(both, push("dev")) == "branch 'dev' matches no on.push.branches"
    assert refusal(both, tag("x1")) == "tag 'x1' matches no on.push.tags"


def test_pull_requests_are_filtered_by_the_branch_they_go_into():
    into_main = on(pull_request_filter={"branches": ["main", "release/**"]})
    assert refusal(into_main, pull_request("main")) is None
    assert refusal(into_main, pull_request("release/1/2")) is None
    # Its own branch does not count, only the target.
    assert refusal(into_main, pull_request("dev", source_branch="main")) == (
        "pull requests into 'dev' match no on.pull_request.branches"
    )
    every_pull_request = on(pull_request_filter={"branches": None})
    assert refusal(every_pull_request, pull_request("anything")) is None


def test_an_event_on_does_not_list_is_ignored():
    only_pull_requests = on(pull_request_filter={"branches": None})
    assert refusal(only_pull_requests, push("main")) == "`on:` lists no push"
    assert refusal(only_pull_requests, tag("v1")) == "`on:` lists no push"
    only_pushes = on({"branches": ["main"], "tags": None})
    assert refusal(only_pushes, pull_request("main")) == "`on:` lists no pull_request"
    nothing = on()  # `on: {}`
    assert refusal(nothing, push("main")) == "`on:` lists no push"
    assert refusal(nothing, pull_request("main")) == "`on:` lists no pull_request"
