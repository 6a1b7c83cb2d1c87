"""Forge webhooks, the pure part: checking a delivery's signature and reading its payload into
what a build needs. Nothing here touches the database: the view caps the body, finds the hook's
secret, calls `verify` then `parse`, deduplicates on `Event.delivery` and triggers.

Forges: GitHub, GitLab and Gitea. Forgejo sends Gitea's payloads, with X-Forgejo-* headers
beside the X-Gitea-* ones; either spelling is accepted, and "forgejo" names the same forge.

    verify(forge, headers, body, secret) -> None       # or WebhookUnauthorized (401)
    parse(forge, headers, body) -> Event | Ping | Ignored  # or InvalidWebhook, UnsupportedEvent

`parse` trusts nothing in the payload, signed or not: every field it reads is type-checked, so
it raises only the errors of forge.errors (never a KeyError or TypeError).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from forge.errors import (
    InvalidWebhook,
    UnsupportedEvent,
    WebhookDeliveryMissing,
    WebhookEventMissing,
    WebhookSignatureMissing,
    WebhookUnauthorized,
)

FORGES = ("github", "gitlab", "gitea", "forgejo")

# The view's default cap on a body (a setting overrides it). GitHub and GitLab send nothing over
# 25 MB; real payloads are far smaller, but a GitHub push lists up to 2048 commits with their
# file lists, a few MB at worst: above the API's 1 MiB so such a push still builds, and far
# enough below 25 MB that a request's memory stays bounded.
DEFAULT_MAX_BODY_BYTES = 5 * 1024 * 1024

# GitHub Actions skips push and pull_request runs for these five ("Skipping workflow runs");
# GitLab CI for [skip ci] and [ci skip] "using any capitalization". We honour all five, in any
# case, anywhere in the message. (GitHub's `skip-checks: true` trailer is for checks: not here.)
SKIP_CI_MARKERS = ("[skip ci]", "[ci skip]", "[no ci]", "[skip actions]", "[actions skip]")

ZERO_SHA = "0" * 40  # `after` of a push that deleted its ref, on all three forges


def skips_ci(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in SKIP_CI_MARKERS)


@dataclass(frozen=True, kw_only=True)
class Event:
    """A push, a tag or a pull request to build."""

    kind: Literal["push", "tag", "pull_request"]
    delivery: str  # the forge's id of the event, to deduplicate on (see _DELIVERY)
    sha: str  # 40 hex: the commit to build (for an annotated tag, the commit it tags)
    ref: str  # what to fetch: refs/heads/X, refs/tags/X, refs/pull/N/head, ...
    branch: str  # the pushed branch, or a pull request's source branch; "" for a tag
    tag: str  # the tag's name, or ""
    target_branch: str  # a pull request's base branch; "" for a push or a tag
    pull_request: int | None  # its number (GitLab: the merge request's iid)
    fork: bool  # the pull request comes from another repository than its base's
    message: str  # the head commit's message where the payload has it, else ""
    repository_url: str  # the clone URL (http or https) of the repository built
    title: str  # the pull request's title, or ""


@dataclass(frozen=True)
class Ping:
    """GitHub's hello when a hook is made. GitLab and Gitea have none (see parse)."""

    delivery: str


@dataclass(frozen=True)
class Ignored:
    """A valid delivery that builds nothing; the view answers 2xx with the reason."""

    reason: str
    delivery: str = ""


# Headers, first spelling first. Forgejo sends both spellings with the same values; Forgejo's
# own comes first so that it keeps working should Forgejo drop the Gitea ones.
_SIGNATURE = {
    "github": ("X-Hub-Signature-256",),  # "sha256=" + hex HMAC-SHA256 of the raw body
    "gitlab": ("X-Gitlab-Token",),  # the secret itself, in clear
    "gitea": ("X-Forgejo-Signature", "X-Gitea-Signature"),  # hex HMAC-SHA256 of the raw body
}
_EVENT = {
    "github": ("X-GitHub-Event",),
    "gitlab": ("X-Gitlab-Event",),
    "gitea": ("X-Forgejo-Event", "X-Gitea-Event"),
}
_DELIVERY = {
    # The same GUID on a redelivery ("Redeliver" in the hook's Recent Deliveries).
    "github": ("X-GitHub-Delivery",),
    # Idempotency-Key (GitLab 17.4+) is the one id kept across retries and "Resend request"
    # (WebHookService gets the logged key back). X-Gitlab-Event-UUID, the fallback for older
    # versions, is made anew for every execution, a resend included, and is shared by all the
    # hooks a webhook-triggered request fires (recursion detection); X-Gitlab-Webhook-UUID is
    # new for every request. So only Idempotency-Key recognises a resend.
    "gitlab": ("Idempotency-Key", "X-Gitlab-Event-UUID"),
    # The hook task's UUID. A "Replay" copies the task under a new UUID: it builds again.
    "gitea": ("X-Forgejo-Delivery", "X-Gitea-Delivery"),
}


def verify(forge: str, headers: Mapping[str, str], body: bytes, secret: str) -> None:
    """Raise WebhookUnauthorized unless the delivery is signed with the hook's secret.

    `body` is the raw request body, exactly as received: the HMAC is over its bytes.
    """
    forge = _forge(forge)
    if not secret:
        raise ValueError("a webhook needs a secret: without one, anybody could sign")
    names = _SIGNATURE[forge]
    found = _Headers(headers).first(names)
    if found is None:
        raise WebhookSignatureMissing(
            f"no {' or '.join(names)} header: give the {forge} hook the secret", header=names[0]
        )
    name, given = found
    key = secret.encode()
    if forge == "gitlab":
        # A token, not a signature: compare digests of both, so the time compare_digest takes
        # (which depends on the lengths) says nothing of the secret's length either.
        ok = hmac.compare_digest(
            hashlib.sha256(_wire(given)).digest(), hashlib.sha256(key).digest()
        )
    else:
        mac = hmac.new(key, body, hashlib.sha256).hexdigest()
        expected = "sha256=" + mac if forge == "github" else mac
        ok = hmac.compare_digest(_wire(given), expected.encode())
    if not ok:
        raise WebhookUnauthorized(
            f"the {name} header does not match the hook's secret", header=name
        )


def parse(forge: str, headers: Mapping[str, str], body: bytes) -> Event | Ping | Ignored:
    """Read a verified delivery: an Event to build, a Ping, or Ignored (with the reason).

    GitLab and Gitea have no ping: their "Test" buttons send an ordinary payload (GitLab: a
    sample built from the project's latest commits, for the event chosen; Gitea: a push of the
    default branch's head, before == after, or a fake all-zero commit in an empty repository,
    which reads as a deleted ref). So a test push builds, as a real one would.
    """
    forge = _forge(forge)
    found_headers = _Headers(headers)
    names = _EVENT[forge]
    found = found_headers.first(names)
    if found is None:
        raise WebhookEventMissing(
            f"no {' or '.join(names)} header: not a {forge} webhook delivery", header=names[0]
        )
    event = found[1]
    handler = _HANDLERS[forge].get(event)
    if handler is None:
        raise UnsupportedEvent(
            f"{forge} event {event[:100]!r} builds nothing: send push and pull request events",
            event=event[:100],
        )
    delivery = _delivery(forge, found_headers)
    return handler(_Context(forge, event, delivery), _json_object(forge, event, body))


# Reading headers


class _Headers:
    """Case-insensitive lookup in any mapping (Django's request.headers already is one)."""

    def __init__(self, headers: Mapping[str, str]):
        self._values = {
            str(name).lower(): value.strip()
            for name, value in headers.items()
            if isinstance(value, str)
        }

    def first(self, names: tuple[str, ...]) -> tuple[str, str] | None:
        """The first of the headers named that is there and not empty, with its name."""
        for name in names:
            value = self._values.get(name.lower())
            if value:
                return name, value
        return None


def _wire(value: str) -> bytes:
    # WSGI and ASGI servers decode header bytes as Latin-1 (PEP 3333): encoding back gives the
    # bytes the forge sent, so a non-ASCII secret compares as GitLab sent it (UTF-8).
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


_DELIVERY_ID = re.compile(r"[!-~]{1,200}")  # printable ASCII: what the forges send (UUIDs)


def _delivery(forge: str, headers: _Headers) -> str:
    # Required: it is how a redelivery is recognised, and GitHub and Gitea always send it.
    names = _DELIVERY[forge]
    found = headers.first(names)
    if found is None:
        raise WebhookDeliveryMissing(
            f"no {' or '.join(names)} header: a delivery needs its id", header=names[0]
        )
    name, value = found
    if not _DELIVERY_ID.fullmatch(value):
        raise InvalidWebhook(
            f"the {name} header is not 1 to 200 printable ASCII characters", header=name
        )
    return value


def _forge(forge: str) -> str:
    if forge == "forgejo":
        return "gitea"
    if forge not in FORGES:
        raise ValueError(f"unknown forge {forge!r}: one of {', '.join(FORGES)}")
    return forge


# Reading the body


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # As the API does: a key twice reads differently in different parsers; refuse it.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey("an object has a key twice")
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_object(forge: str, event: str, body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidWebhook(
            f"the {forge} {event} payload is not JSON ({reason}): set the hook's content type "
            "to application/json",
            event=event,
        ) from None
    if not isinstance(payload, dict):
        raise InvalidWebhook(f"the {forge} {event} payload is not a JSON object", event=event)
    return payload


# Field types. Every model is strict: a number given as a string, a bool for an int, a null
# where the forge documents a value are refused rather than converted.


_SHA = re.compile(r"[0-9a-f]{40}")
_CLONE_URL = re.compile(r"https?://[^\x00-\x20\x7f]+")


def _sha(value: str) -> str:
    if not _SHA.fullmatch(value):
        raise PydanticCustomError("sha", "should be a 40-character lowercase hex commit id")
    return value


# git check-ref-format's rules: what a forge accepted as a ref is always valid, so anything
# else is not from a forge, and what reaches `git fetch` is a ref and nothing more.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def _is_ref(ref: str) -> bool:
    return (
        not _REF_FORBIDDEN.search(ref)
        and not ref.endswith((".", "/"))
        and all(part and not part.startswith(".") for part in ref.split("/"))
        and not any(part.endswith(".lock") for part in ref.split("/"))
    )


def _push_ref(value: str) -> str:
    if not value.startswith(("refs/heads/", "refs/tags/")) or not _is_ref(value):
        raise PydanticCustomError("ref", "should be a valid refs/heads/... or refs/tags/... ref")
    return value


def _branch(value: str) -> str:
    if not value or not _is_ref("refs/heads/" + value):
        raise PydanticCustomError("branch", "should be a valid branch name")
    return value


def _clone_url(value: str) -> str:
    # http(s) only: a payload must not point git at ext::, file:// or a local path.
    if not _CLONE_URL.fullmatch(value):
        raise PydanticCustomError("url", "should be an http or https URL")
    return value


Sha = Annotated[str, AfterValidator(_sha)]
PushRef = Annotated[str, AfterValidator(_push_ref)]
Branch = Annotated[str, AfterValidator(_branch)]
CloneUrl = Annotated[str, AfterValidator(_clone_url)]
Number = Annotated[int, Field(gt=0, le=2**31 - 1)]  # fits a database integer column


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Commit(_Model):
    id: Sha
    message: str


class _Repository(_Model):  # GitHub's and Gitea's
    full_name: str
    clone_url: CloneUrl


class _GitHubPush(_Model):
    ref: PushRef
    after: Sha
    deleted: bool = False
    head_commit: _Commit | None = None  # null when the push deleted its ref
    repository: _Repository


class _GiteaPush(_Model):
    ref: PushRef
    after: Sha
    head_commit: _Commit | None = None
    commits: list[_Commit] | None = None  # newest first; Go's nil slice marshals as null
    repository: _Repository


class _RepositoryName(_Model):
    full_name: str


class _Head(_Model):
    ref: Branch  # the source branch's name
    sha: Sha
    repo: _RepositoryName | None = None  # null once the fork is deleted


class _Base(_Model):
    ref: Branch
    repo: _RepositoryName


class _PullRequest(_Model):
    title: str
    head: _Head
    base: _Base


class _PullRequestEvent(_Model):  # GitHub's, and Gitea's, which copies its shape
    number: Number
    pull_request: _PullRequest
    repository: _Repository  # the base repository, where refs/pull/N/head is


class _GitLabProject(_Model):
    git_http_url: CloneUrl


class _GitLabPush(_Model):
    object_kind: str
    ref: PushRef
    after: Sha  # for an annotated tag, the tag object
    checkout_sha: Sha | None = None  # the commit; null when the push deleted its ref
    commits: list[_Commit] | None = None  # the newest 20; their order changed over versions
    project: _GitLabProject


class _GitLabMergeRequest(_Model):
    iid: Number
    source_branch: Branch
    target_branch: Branch
    source_project_id: int
    target_project_id: int
    title: str
    last_commit: _Commit
    oldrev: Sha | None = None  # only on an update that brought new commits


class _GitLabMergeRequestEvent(_Model):
    object_kind: str
    object_attributes: _GitLabMergeRequest
    project: _GitLabProject  # the target project, where refs/merge-requests/N/head is


_M = TypeVar("_M", bound=_Model)


@dataclass(frozen=True)
class _Context:
    forge: str
    event: str
    delivery: str

    def validate(self, model: type[_M], payload: dict[str, Any]) -> _M:
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            field = ".".join(str(part) for part in error["loc"]) or "(payload)"
            raise self.invalid(f"{field}: {error['msg']}", field) from None

    def invalid(self, what: str, field: str) -> InvalidWebhook:
        return InvalidWebhook(
            f"the {self.forge} {self.event} payload's {what}", event=self.event, field=field
        )

    def ignored(self, reason: str) -> Ignored:
        return Ignored(reason, self.delivery)


def _action(context: _Context, container: dict[str, Any], field: str) -> str | None:
    action = container.get("action")
    if action is not None and not isinstance(action, str):
        raise context.invalid(f"{field}: should be a string", field)
    return action


def _push_event(context: _Context, ref: str, sha: str, message: str, url: str) -> Event:
    tag = ref.removeprefix("refs/tags/") if ref.startswith("refs/tags/") else ""
    return Event(
        kind="tag" if tag else "push",
        delivery=context.delivery,
        sha=sha,
        ref=ref,
        branch="" if tag else ref.removeprefix("refs/heads/"),
        tag=tag,
        target_branch="",
        pull_request=None,
        fork=False,
        message=message,
        repository_url=url,
        title="",
    )


def _message_of(sha: str, commits: list[_Commit] | None) -> str:
    # By id, never by position: Gitea lists the newest first, GitLab's order changed over time.
    return next((commit.message for commit in commits or () if commit.id == sha), "")


# Handlers: (context, payload) -> Event | Ping | Ignored


def _github_ping(context: _Context, payload: dict[str, Any]) -> Ping:
    return Ping(context.delivery)


def _github_push(context: _Context, payload: dict[str, Any]) -> Event | Ignored:
    push = context.validate(_GitHubPush, payload)
    if push.deleted or push.after == ZERO_SHA:
        return context.ignored("the ref was deleted")
    # head_commit is the commit at `after`; for an annotated tag, `after` is the tag object
    # and head_commit the commit it tags.
    head = push.head_commit
    sha, message = (head.id, head.message) if head else (push.after, "")
    return _push_event(context, push.ref, sha, message, push.repository.clone_url)


def _gitea_push(context: _Context, payload: dict[str, Any]) -> Event | Ignored:
    # Gitea sends a `delete` event, not a push, for a deleted ref; the zero `after` is checked
    # all the same, and is what its "Test" push of an empty repository carries.
    push = context.validate(_GiteaPush, payload)
    if push.after == ZERO_SHA:
        return context.ignored("the ref was deleted")
    head = push.head_commit  # as GitHub's: for an annotated tag, the commit it tags
    sha = head.id if head else push.after
    message = head.message if head else _message_of(sha, push.commits)
    return _push_event(context, push.ref, sha, message, push.repository.clone_url)


_BUILDING_ACTIONS = {
    "github": ("opened", "synchronize", "reopened"),
    "gitea": ("opened", "synchronized", "reopened"),
}


def _pull_request(forge: str) -> Callable[[_Context, dict[str, Any]], Event | Ignored]:
    def handle(context: _Context, payload: dict[str, Any]) -> Event | Ignored:
        action = _action(context, payload, "action")
        if action is None:
            raise context.invalid("action: Field required", "action")
        if action not in _BUILDING_ACTIONS[forge]:
            return context.ignored(f"pull request action {action[:100]!r} builds nothing")
        event = context.validate(_PullRequestEvent, payload)
        pull = event.pull_request
        return Event(
            kind="pull_request",
            delivery=context.delivery,
            sha=pull.head.sha,
            ref=f"refs/pull/{event.number}/head",
            branch=pull.head.ref,
            tag="",
            target_branch=pull.base.ref,
            pull_request=event.number,
            fork=pull.head.repo is None or pull.head.repo.full_name != pull.base.repo.full_name,
            message="",  # neither forge puts the head commit's message in the payload
            repository_url=event.repository.clone_url,
            title=pull.title,
        )

    return handle


def _created(context: _Context, payload: dict[str, Any]) -> Ignored:
    return context.ignored("a created ref builds from its push event, not this one")


def _deleted(context: _Context, payload: dict[str, Any]) -> Ignored:
    return context.ignored("the ref was deleted")


def _gitlab_push(
    object_kind: str, prefix: str
) -> Callable[[_Context, dict[str, Any]], Event | Ignored]:
    def handle(context: _Context, payload: dict[str, Any]) -> Event | Ignored:
        push = context.validate(_GitLabPush, payload)
        if push.object_kind != object_kind:
            raise context.invalid(f"object_kind: should be {object_kind!r}", "object_kind")
        if not push.ref.startswith(prefix):
            raise context.invalid(f"ref: should start with {prefix}", "ref")
        # A deleted ref: `after` is zeros and checkout_sha null (absent only in old versions).
        if push.after == ZERO_SHA or (
            "checkout_sha" in push.model_fields_set and push.checkout_sha is None
        ):
            return context.ignored("the ref was deleted")
        sha = push.checkout_sha or push.after  # for an annotated tag, the commit, not the tag
        message = _message_of(sha, push.commits)
        return _push_event(context, push.ref, sha, message, push.project.git_http_url)

    return handle


def _gitlab_merge_request(context: _Context, payload: dict[str, Any]) -> Event | Ignored:
    attributes = payload.get("object_attributes")
    if not isinstance(attributes, dict):
        raise context.invalid("object_attributes: should be an object", "object_attributes")
    action = _action(context, attributes, "object_attributes.action")
    if action is None:
        return context.ignored("a merge request event without an action builds nothing")
    if action == "update" and attributes.get("oldrev") is None:
        # `update` is also a title, label or assignee edit; oldrev says it brought commits.
        return context.ignored("a merge request update without new commits builds nothing")
    if action not in ("open", "reopen", "update"):
        return context.ignored(f"merge request action {action[:100]!r} builds nothing")
    event = context.validate(_GitLabMergeRequestEvent, payload)
    if event.object_kind != "merge_request":
        raise context.invalid("object_kind: should be 'merge_request'", "object_kind")
    merge_request = event.object_attributes
    return Event(
        kind="pull_request",
        delivery=context.delivery,
        sha=merge_request.last_commit.id,
        ref=f"refs/merge-requests/{merge_request.iid}/head",
        branch=merge_request.source_branch,
        tag="",
        target_branch=merge_request.target_branch,
        pull_request=merge_request.iid,
        fork=merge_request.source_project_id != merge_request.target_project_id,
        message=merge_request.last_commit.message,
        repository_url=event.project.git_http_url,
        title=merge_request.title,
    )


_HANDLERS: dict[str, dict[str, Callable[[_Context, dict[str, Any]], Event | Ping | Ignored]]] = {
    "github": {
        "ping": _github_ping,
        "push": _github_push,
        "pull_request": _pull_request("github"),
        "create": _created,  # as Gitea's: the push event that comes with it builds
        "delete": _deleted,
    },
    "gitlab": {
        "Push Hook": _gitlab_push("push", "refs/heads/"),
        "Tag Push Hook": _gitlab_push("tag_push", "refs/tags/"),
        "Merge Request Hook": _gitlab_merge_request,
    },
    "gitea": {
        "push": _gitea_push,  # tags too: a pushed tag comes as a push and a create
        "pull_request": _pull_request("gitea"),  # X-Gitea-Event-Type tells sync; action too
        "create": _created,
        "delete": _deleted,
    },
}
