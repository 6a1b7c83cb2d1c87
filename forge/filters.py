"""A pipeline's `on:` (builds.definition.OnSpec): which forge events make a build. Globs: `*`
matches within a part of a name (not `/`), `**` across parts, `?` one character; anything
else stands for itself (simpler than GitHub Actions' patterns, which also have `+`, `[...]`
and `!`)."""

import functools
import re

from builds.source import Event, Source


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcards = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part) or re.escape(part) for part in parts))


def glob_matches(pattern: str, name: str) -> bool:
    return _compiled(pattern).fullmatch(name) is not None


def _any_match(patterns: list[str], name: str) -> bool:
    return any(glob_matches(pattern, name) for pattern in patterns)


def refusal(on: dict | None, source: Source) -> str | None:
    """Why `on:` builds nothing for this event ("ignored: ..."), or None if it builds."""
    if on is None:  # no `on:`: every push and pull request
        return None
    if source.event == Event.PULL_REQUEST:
        wanted = on.get("pull_request")
        if wanted is None:
            return "`on:` lists no pull_request"
        branches = wanted.get("branches")
        if branches is not None and not _any_match(branches, source.target_branch):
            return f"pull requests into {source.target_branch!r} match no on.pull_request.branches"
        return None
    wanted = on.get("push")
    if wanted is None:
        return "`on:` lists no push"
    branches, tags = wanted.get("branches"), wanted.get("tags")
    if source.event == Event.TAG:
        if tags is None and branches is not None:  # only branches listed: no tag builds
            return "on.push lists branches only, no tags"
        if tags is not None and not _any_match(tags, source.tag):
            return f"tag {source.tag!r} matches no on.push.tags"
        return None
    if branches is None and tags is not None:  # only tags listed: no branch builds
        return "on.push lists tags only, no branches"
    if branches is not None and not _any_match(branches, source.branch):
        return f"branch {source.branch!r} matches no on.push.branches"
    return None
