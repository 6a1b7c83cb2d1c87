"""Posting a build's status to the commit it built, on GitHub, Gitea (and Forgejo, its fork,
which keeps the same API) and GitLab. Pure HTTP: no database, no retries. The caller decides
when to post, records each attempt and schedules the retries (with backoff, and no sooner
than `StatusDeliveryError.retry_after`); one call here is one HTTP request, always with a
timeout.

The endpoints, headers and bodies follow each forge's documented REST API:

- GitHub: `POST {api}/repos/{owner}/{repo}/statuses/{sha}`
  (https://docs.github.com/en/rest/commits/statuses), 201.
- Gitea / Forgejo: `POST {api}/api/v1/repos/{owner}/{repo}/statuses/{sha}`
  (`CreateStatusOption` in the instance's /api/swagger), 201.
- GitLab: `POST {api}/api/v4/projects/{url-encoded path}/statuses/{sha}`
  (https://docs.gitlab.com/api/commits/#set-the-pipeline-status-of-a-commit), 201.

A token is only ever put in a request header: never in a URL, an error message or a log line
(the forge's answer is scrubbed of it too, in case it echoes what it was sent).
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote, urlsplit

import requests

logger = logging.getLogger(__name__)

GITHUB, GITEA, GITLAB = "github", "gitea", "gitlab"  # Gitea also names Forgejo: same API
FORGES = (GITHUB, GITEA, GITLAB)
FORGE_NAMES = {GITHUB: "GitHub", GITEA: "Gitea", GITLAB: "GitLab"}

# The states each forge's API accepts (GitLab's `skipped` is left out: no build status means it).
FORGE_STATE_VALUES = {
    GITHUB: frozenset({"pending", "success", "failure", "error"}),
    GITEA: frozenset({"pending", "success", "error", "failure", "warning"}),
    GITLAB: frozenset({"pending", "running", "success", "failed", "canceled"}),
}

# Our build status -> each forge's state: the one table.
# - GitHub and Gitea have no "running" and no "canceled": whatever is not final is `pending`
#   (a required check then keeps a merge waiting), and a build that ended without a verdict
#   on the code (canceled, or never picked up by an agent) is `error`, the check itself
#   having gone wrong, not `failure`, which would blame the commit. Both block a required
#   check, as they should: the commit was not shown good. Gitea's `warning` (a result with
#   remarks) is neither, and is left out so that both columns stay alike.
# - GitLab: CANCELLING stays `running` (its cleanup steps still run; a cancel from QUEUED
#   shows it left the queue); it then ends `canceled`. GitLab has no `error`, so
#   QUEUE_TIMEOUT is `failed`: nobody canceled it, and `failed` is what notifies and asks for
#   a rerun (`canceled` would say a person stopped it). RUNNING -> CANCELLING posts `running`
#   twice: GitLab's answer to that is handled in `post_status`.
# Every final status maps to a final state, so no forge is left showing `pending` for a build
# that has ended; a retried build (final -> QUEUED again) posts `pending` anew, which every
# forge accepts (GitLab opens a new job for it, the old one being finished).
FORGE_STATES: dict[str, dict[str, str]] = {
    #                 GitHub / Gitea               GitLab
    "QUEUED": {GITHUB: "pending", GITEA: "pending", GITLAB: "pending"},
    "RUNNING": {GITHUB: "pending", GITEA: "pending", GITLAB: "running"},
    "CANCELLING": {GITHUB: "pending", GITEA: "pending", GITLAB: "running"},
    "SUCCEEDED": {GITHUB: "success", GITEA: "success", GITLAB: "success"},
    "FAILED": {GITHUB: "failure", GITEA: "failure", GITLAB: "failed"},
    "CANCELED": {GITHUB: "error", GITEA: "error", GITLAB: "canceled"},
    "QUEUE_TIMEOUT": {GITHUB: "error", GITEA: "error", GITLAB: "failed"},
}

# (description, how a duration is put after it); a status without the latter ignores one.
_DESCRIPTIONS = {
    "QUEUED": ("queued", None),
    "RUNNING": ("running", None),
    "CANCELLING": ("cancelling", None),
    "SUCCEEDED": ("succeeded", "in"),
    "FAILED": ("failed", "after"),
    "CANCELED": ("canceled", "after"),
    "QUEUE_TIMEOUT": ("no agent took it", "within"),
}

# GitHub refuses a longer description with 422; applied to every forge so that a status
# reads the same everywhere (and stays short in their lists of checks).
DESCRIPTION_MAX = 140
ERROR_DETAIL_MAX = 300  # of the forge's answer, in an error message
DEFAULT_TIMEOUT = 10  # seconds, to connect and then between bytes of the answer

_SCHEMES = {"https", "http", "ssh", "git", "git+ssh", "ssh+git"}
# scp-like syntax, as git reads it: `[user@]host:path`, no slash before the colon.
_SCP = re.compile(r"(?:[^@/]+@)?(?P<host>\[[^\]/]+\]|[^:/\[\]]+):(?P<path>.+)")
_USERINFO = re.compile(r"//[^/?#]*@")
_SHA = re.compile(r"[0-9a-fA-F]{7,64}")  # SHA-1 or SHA-256 object names, abbreviated or not


class StatusDeliveryError(Exception):
    """A status was not delivered. `retryable`: the same request may succeed later (network
    error, timeout, 5xx, 429, and the few 4xx that mean "not now"); `retry_after`: seconds
    the forge asked to wait first (Retry-After, or GitHub's rate-limit reset), or None.
    `http_status` is None when no answer came. The message says what the forge answered,
    never the token."""

    def __init__(
        self,
        message: str,
        http_status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.retryable = retryable
        self.retry_after = retry_after


class StatusConfigError(StatusDeliveryError, ValueError):
    """What no attempt can deliver: an unknown forge or state, a clone URL, API URL, repository
    path or SHA no forge takes. A ValueError, for who checks a configuration, and a final
    StatusDeliveryError, for who delivers (it then gives that status up at once)."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


def forge_state(forge: str, build_status: str) -> str:
    """The state to post to `forge` for one of our build statuses (a BuildStatus or its
    value)."""
    _check_forge(forge)
    try:
        return FORGE_STATES[str(build_status)][forge]
    except KeyError:
        raise ValueError(f"unknown build status {build_status!r}") from None


def describe(build_status: str, duration: timedelta | float | None = None) -> str:
    """A short description of a build status: "queued", "running", ...; with the build's
    duration (a timedelta or seconds), a final one says it: "succeeded in 1m 2s"."""
    try:
        text, joiner = _DESCRIPTIONS[str(build_status)]
    except KeyError:
        raise ValueError(f"unknown build status {build_status!r}") from None
    if duration is None or joiner is None:
        return text
    return f"{text} {joiner} {format_duration(duration)}"


def format_duration(duration: timedelta | float) -> str:
    """`1h 0m 5s`, `1m 2s`, `45s`: whole seconds, no leading zero units."""
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def repository_path(clone_url: str) -> tuple[str, str]:
    """(host, "owner/repo") of a clone URL: https (`https://host/owner/repo.git`), http, ssh
    (`ssh://git@host:2222/owner/repo.git`), git://, or scp-like (`git@host:owner/repo.git`).
    A GitLab project in nested groups keeps them all (`group/sub/repo`). The host is in
    lower case, with its port for http(s) only (an ssh port says nothing of the web one)
    and never with credentials. Raises StatusConfigError (a ValueError) for anything else."""
    return _parse_clone_url(clone_url)[1:]


def default_api_url(forge: str, clone_url: str) -> str:
    """The API base URL `post_status` takes, as the forge serves it for the host of
    `clone_url`: github.com -> https://api.github.com; GitHub Enterprise Server ->
    https://HOST/api/v3 (Enterprise Cloud with data residency, *.ghe.com ->
    https://api.HOST); Gitea and GitLab -> the instance's root, https://HOST (http and the
    port kept from an http clone URL). An instance whose web port or path prefix differs
    from its clone URL's needs its API URL configured instead."""
    _check_forge(forge)
    scheme, host, path = _parse_clone_url(clone_url)
    if forge in (GITHUB, GITEA):
        _owner_repo(forge, path)  # refused now rather than at the first post
    if forge == GITHUB:
        if host in ("github.com", "www.github.com"):
            return "https://api.github.com"
        if host.endswith(".ghe.com"):
            return f"https://api.{host}"
        return f"https://{host}/api/v3"
    return f"{scheme}://{host}"


def post_status(
    forge: str,
    api_url: str,
    repo_path: str,
    sha: str,
    state: str,
    *,
    context: str,
    target_url: str | None = None,
    description: str | None = None,
    ref: str | None = None,
    token: str,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
) -> int:
    """Post one commit status; return the HTTP status of the answer that delivered it.

    `state` is the forge's own (see `forge_state`); `context` names the check (GitLab calls
    it `name`); `description` is cut to 140 characters; `ref` (the branch or tag built) is
    sent to GitLab only, which otherwise attaches the status to the first branch holding the
    commit (and answers 404 for a commit on none); `target_url` and `description` are left
    out when None. `session` (optional) reuses connections; otherwise each call has its own.
    Redirects are not followed (the answer is an error saying where it pointed).

    Delivered: any 2xx (201 documented), and GitLab's 400 "Cannot transition status via
    :run from :running" (returned as 400). GitLab keeps an external status as a job that is
    found again while pending or running and moved by an event (`enqueue` for `pending`,
    `run` for `running`); moving it to where it already is, or back from running to pending,
    is refused so. The forge then already shows this state or a later one, which is all a
    post asks: it happens when RUNNING -> CANCELLING posts `running` twice, and when a post
    is sent again after its answer was lost (a timeout) though GitLab had applied it.

    Raises StatusDeliveryError otherwise: StatusConfigError (final, and a ValueError) before
    any request for arguments no forge could take (an unknown forge or state, a bad SHA, API
    URL or repository path, no token or no timeout)."""
    _check_forge(forge)
    if state not in FORGE_STATE_VALUES[forge]:
        raise StatusConfigError(f"{FORGE_NAMES[forge]} takes no state {state!r}")
    if not _SHA.fullmatch(sha):
        raise StatusConfigError(f"not a commit SHA: {sha!r}")
    if timeout is None:
        raise StatusConfigError("a timeout is required")
    if not token:
        raise StatusConfigError("a token is required")
    base = _api_base(api_url)
    url = f"{base}{_endpoint(forge, repo_path, sha)}"
    headers, body = _request(forge, state, context, target_url, description, ref, token)
    name = FORGE_NAMES[forge]

    # No redirects: a custom auth header would go along to wherever they point. And no
    # ~/.netrc: requests would add its Basic credentials to a request without Authorization
    # (GitLab's), beside the documented header.
    options = dict(
        json=body, headers=headers, timeout=timeout, allow_redirects=False, auth=_as_given
    )
    try:
        if session is None:
            with requests.Session() as own:
                response = own.post(url, **options)
        else:
            response = session.post(url, **options)
    except requests.Timeout:
        # The forge may have applied it: posting it again is harmless (GitHub and Gitea keep
        # the latest per context, GitLab refuses the repeat as delivered, above).
        raise StatusDeliveryError(
            f"{name} at {base} did not answer within {_seconds(timeout)} s", retryable=True
        ) from None
    except (
        requests.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    ) as exc:
        raise StatusDeliveryError(
            f"could not reach {name} at {base}: {_network_detail(exc, token)}", retryable=True
        ) from None
    except requests.RequestException as exc:  # an invalid URL or header: no later attempt helps
        raise StatusDeliveryError(
            f"could not post to {name} at {base}: {_network_detail(exc, token)}"
        ) from None

    status = response.status_code
    if 200 <= status < 300:
        logger.debug("%s status %s delivered to %s: %s", name, state, url, status)
        return status
    if forge == GITLAB and status == 400 and "cannot transition" in response.text.lower():
        logger.debug("%s already shows %s or later at %s: %s", name, state, url, status)
        return status
    raise _answer_error(forge, url, response, token)


def _check_forge(forge: str) -> None:
    if forge not in FORGES:
        raise StatusConfigError(f"unknown forge {forge!r}: one of {', '.join(FORGES)}")


def _parse_clone_url(clone_url: str) -> tuple[str, str, str]:
    """(scheme of the web URL to guess, host, path) of a clone URL."""
    url = clone_url.strip()
    if "://" in url:
        try:
            parts = urlsplit(url)
            port = parts.port  # ValueError for a port out of range or not a number
        except ValueError as exc:
            raise StatusConfigError(f"not a clone URL: {_shown(clone_url)} ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES or not parts.hostname:
            raise StatusConfigError(f"not a clone URL: {_shown(clone_url)}")
        host = parts.hostname  # lower case, without credentials or IPv6 brackets
        if ":" in host:
            host = f"[{host}]"
        web = scheme if scheme in ("http", "https") else "https"
        if port is not None and web == scheme:
            host = f"{host}:{port}"
        path = unquote(parts.path)
    else:
        match = _SCP.fullmatch(url)
        if not match:
            raise StatusConfigError(f"not a clone URL: {_shown(clone_url)}")
        web, host, path = "https", match["host"].lower(), match["path"]
    path = path.strip("/")
    path = path.removesuffix(".git").rstrip("/")
    segments = path.split("/")
    if len(segments) < 2 or any(s in ("", ".", "..") or s.isspace() for s in segments):
        raise StatusConfigError(f"no owner/repository in clone URL {_shown(clone_url)}")
    return web, host, path


def _owner_repo(forge: str, repo_path: str) -> tuple[str, str]:
    segments = repo_path.strip("/").split("/")
    if len(segments) != 2 or not all(segments):
        raise StatusConfigError(
            f"{FORGE_NAMES[forge]} repositories are owner/repo, not {repo_path!r}"
        )
    return segments[0], segments[1]


def _api_base(api_url: str) -> str:
    try:
        parts = urlsplit(api_url.strip())
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise StatusConfigError(f"not an http(s) API URL: {_shown(api_url)} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StatusConfigError(f"not an http(s) API URL: {_shown(api_url)}")
    if parts.username or parts.password:
        raise StatusConfigError(
            "the API URL must not carry credentials: the token goes in a header"
        )
    if parts.query or parts.fragment:
        raise StatusConfigError(f"an API URL has no query or fragment: {_shown(api_url)}")
    return api_url.strip().rstrip("/")


def _endpoint(forge: str, repo_path: str, sha: str) -> str:
    if forge == GITLAB:
        path = repo_path.strip("/")
        segments = path.split("/")
        if len(segments) < 2 or "" in segments:
            raise StatusConfigError(f"GitLab projects are namespace/project, not {repo_path!r}")
        # The project's full path as one segment: `group%2Fsub%2Frepo`.
        return f"/api/v4/projects/{quote(path, safe='')}/statuses/{sha}"
    owner, repo = (quote(part, safe="") for part in _owner_repo(forge, repo_path))
    prefix = "" if forge == GITHUB else "/api/v1"  # GitHub's API URL includes its prefix
    return f"{prefix}/repos/{owner}/{repo}/statuses/{sha}"


def _as_given(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


def _request(
    forge: str,
    state: str,
    context: str,
    target_url: str | None,
    description: str | None,
    ref: str | None,
    token: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, JSON body) of the post."""
    if description is not None and len(description) > DESCRIPTION_MAX:
        description = description[: DESCRIPTION_MAX - 1] + "…"
    optional = {"target_url": target_url, "description": description}
    if forge == GITHUB:
        headers = {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {token}",
            "X-GitHub-Api-Version": "2022-11-28",
        }
        body = {"state": state, "context": context}
    elif forge == GITEA:
        headers = {"Accept": "application/json", "Authorization": f"token {token}"}
        body = {"state": state, "context": context}
    else:
        headers = {"Accept": "application/json", "PRIVATE-TOKEN": token}
        body = {"state": state, "name": context}
        optional["ref"] = ref
    headers["User-Agent"] = "ciproject"  # GitHub refuses requests without one
    body.update((key, value) for key, value in optional.items() if value is not None)
    return headers, body


def _answer_error(
    forge: str, url: str, response: requests.Response, token: str
) -> StatusDeliveryError:
    name, status = FORGE_NAMES[forge], response.status_code
    where = urlsplit(url).path
    if 300 <= status < 400:
        location = _scrub(response.headers.get("Location", "nowhere"), token)
        return StatusDeliveryError(
            f"{name} answered {status}, a redirect to {_trim(location)}, for POST {where}: "
            "not followed (the token would go along); configure the API URL it points to",
            http_status=status,
        )
    detail = _answer_detail(response, token)
    retry_after = _retry_after(response.headers)
    rate_limited = status == 403 and (retry_after is not None or "rate limit" in detail.lower())
    retryable = (
        status >= 500
        or status in (408, 429)
        # GitHub answers a rate limit with 403 or 429 (docs: "Rate limits for the REST API").
        or (forge == GITHUB and rate_limited)
        # GitLab: "Another update to this commit status is in progress" (its lock on the
        # commit's statuses was held too long); the same post succeeds once it is released.
        or (forge == GITLAB and status == 409)
    )
    reason = f" {response.reason}" if response.reason else ""
    return StatusDeliveryError(
        f"{name} answered {status}{reason} for POST {where}: {detail}",
        http_status=status,
        retryable=retryable,
        retry_after=retry_after if retryable else None,
    )


def _answer_detail(response: requests.Response, token: str) -> str:
    """What the forge said, short: the message fields of a JSON error, else the text."""
    raw = response.content[:8192].decode("utf-8", errors="replace")  # all three send UTF-8
    text = raw
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        # GitHub: message (+ errors); Gitea: message; GitLab: message (a text or a dict of
        # fields), or error and error_description for OAuth errors.
        picked = {
            key: payload[key]
            for key in ("message", "errors", "error", "error_description")
            if key in payload
        }
        if list(picked) == ["message"] and isinstance(picked["message"], str):
            text = picked["message"]
        else:
            text = json.dumps(picked or payload, ensure_ascii=False, separators=(",", ":"))
    text = " ".join(_scrub(text, token).split())
    return _trim(text) if text else "(an empty answer)"


def _retry_after(headers) -> float | None:
    """Seconds to wait before trying again, as the answer asks: Retry-After (seconds or an
    HTTP date), else GitHub's exhausted rate limit (x-ratelimit-remaining: 0, until
    x-ratelimit-reset, epoch seconds)."""
    value = headers.get("Retry-After")
    if value is not None:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    if headers.get("x-ratelimit-remaining", "").strip() == "0":
        try:
            reset = float(headers.get("x-ratelimit-reset", ""))
        except ValueError:
            return None
        return max(0.0, reset - time.time())
    return None


def _network_detail(exc: Exception, token: str) -> str:
    return _trim(" ".join(_scrub(f"{type(exc).__name__}: {exc}", token).split()))


def _shown(url: str) -> str:
    """A URL for a message, without the credentials it may carry (`https://user:token@...`)."""
    return repr(_USERINFO.sub("//[credentials]@", url))


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "[token]") if token else text


def _trim(text: str) -> str:
    return text if len(text) <= ERROR_DETAIL_MAX else text[: ERROR_DETAIL_MAX - 1] + "…"


def _seconds(timeout) -> str:
    return "/".join(str(t) for t in timeout) if isinstance(timeout, tuple) else str(timeout)
