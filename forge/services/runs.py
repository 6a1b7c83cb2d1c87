"""Builds of a chosen commit: run now (a branch's head, or a commit) from the API and the
admin, and a schedule's tick (forge.services.schedules)."""

import re

from builds.models import Pipeline
from builds.services.triggering import Triggered, trigger
from builds.source import Event, Source
from forge import git
from forge.errors import InvalidRun, RepositoryNotFound
from forge.models import Repository
from forge.services import repositories, statuses
from vault import services as vault

SHA_RE = re.compile(r"[0-9a-f]{40}")


def repository_of(pipeline: Pipeline) -> Repository:
    repository = Repository.objects.filter(pipeline=pipeline).first()
    if repository is None:
        raise RepositoryNotFound(f"pipeline {pipeline.name} has no repository")
    return repository


def source_for(repository: Repository, event: str, branch: str = "", sha: str = "") -> Source:
    """The source of a build of `sha` (or, without it, of `branch`'s head, asked of the
    forge) on `branch` (or the repository's default branch)."""
    branch = branch or repository.default_branch
    if not repositories.BRANCH_RE.fullmatch(branch):
        raise InvalidRun(f"branch: {branch[:100]!r} is not a branch name", field="branch")
    if sha and not SHA_RE.fullmatch(sha):
        raise InvalidRun("commit: 40 hexadecimal digits, in lower case", field="commit")
    if not sha:
        sha = git.head_of(repository.clone_url, branch, clone_credentials(repository))
    return Source(
        event=event,
        sha=sha,
        ref=f"refs/heads/{branch}",
        repository_url=repository.clone_url,
        branch=branch,
    )


def clone_credentials(repository: Repository) -> dict | None:
    if not repository.clone_secret:
        return None
    password = vault.server_value(repository.pipeline, repository.clone_secret)
    return {"username": repository.git_username, "password": password}


def run_now(
    pipeline: Pipeline, branch="", sha="", variables=None, user=None, idempotency_key=""
) -> Triggered:
    """A build of `sha`, or of `branch`'s head now, with the trigger's `variables`."""
    for name, value in (("branch", branch), ("commit", sha)):
        if not isinstance(value, str):
            raise InvalidRun(f"{name}: text", field=name)
    source = source_for(repository_of(pipeline), Event.MANUAL, branch, sha)
    return trigger(
        pipeline,
        variables,
        user,
        idempotency_key,
        source=source,
        on_created=statuses.owe,
    )
