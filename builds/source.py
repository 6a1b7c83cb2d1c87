"""What a build is built from: the commit a forge's webhook, a schedule or a run-now named
(forge.services make them), kept on the build (Build.source) and given to its steps and its
concurrency key as CI_* values the server sets, never a trigger."""

from dataclasses import asdict, dataclass, fields


class Event:
    PUSH, TAG, PULL_REQUEST = "push", "tag", "pull_request"
    SCHEDULE, MANUAL = "schedule", "manual"  # a schedule's tick; run now from the API or admin


@dataclass(frozen=True)
class Source:
    event: str
    sha: str  # the commit, 40 hex digits
    ref: str  # what the agent fetches: refs/heads/X, refs/tags/X, refs/pull/N/head, ...
    repository_url: str
    branch: str = ""  # the pushed branch, or a pull request's source branch
    tag: str = ""
    target_branch: str = ""  # a pull request's base
    pull_request: int | None = None
    fork: bool = False  # a pull request from another repository: its build is untrusted

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, stored: dict | None) -> "Source | None":
        """The source a build stored (Build.source), or None for a build of no commit."""
        if not stored:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in names})

    def ci_variables(self) -> dict[str, str]:
        """What the build's steps (and its concurrency key) see of it."""
        values = {
            "CI_EVENT": self.event,
            "CI_COMMIT_SHA": self.sha,
            "CI_COMMIT_REF": self.ref,
            "CI_REPOSITORY_URL": self.repository_url,
            "CI_COMMIT_BRANCH": self.branch,
            "CI_COMMIT_TAG": self.tag,
            "CI_PULL_REQUEST_NUMBER": "" if self.pull_request is None else str(self.pull_request),
            "CI_PULL_REQUEST_TARGET_BRANCH": self.target_branch,
        }
        return {name: value for name, value in values.items() if value}


def ci_variables(stored: dict | None) -> dict[str, str]:
    source = Source.of(stored)
    return source.ci_variables() if source else {}
