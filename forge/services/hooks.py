"""A forge's webhook: authenticated by the forge's own signature over the raw body, then a
build of the event's commit, unless the pipeline's `on:` or the commit's `[skip ci]` says
otherwise. The delivery id is the trigger's idempotency key: a redelivery makes no second
build."""

from dataclasses import dataclass

from builds.services.triggering import trigger
from builds.source import Event, Source
from forge import filters, webhooks
from forge.errors import RepositoryNotFound, WebhookForgeMismatch
from forge.models import Repository
from forge.services import repositories, statuses


@dataclass(frozen=True)
class Answer:
    status: int  # HTTP
    body: dict


def ignored(why: str) -> Answer:
    return Answer(200, {"status": "ignored", "detail": f"ignored: {why}"})


def receive(pipeline_id: int, forge: str, headers, body: bytes) -> Answer:
    repository = Repository.objects.select_related("pipeline").filter(pipeline_id=pipeline_id)
    repository = repository.first()
    if repository is None:
        raise RepositoryNotFound(f"pipeline {pipeline_id} has no repository")
    # The signature first: nothing about the pipeline is told to a sender without it.
    webhooks.verify(forge, headers, body, repositories.webhook_secret(repository))
    if forge != repository.forge:
        raise WebhookForgeMismatch(
            f"this pipeline's repository is on {repository.forge}, not {forge}",
            forge=repository.forge,
        )
    parsed = webhooks.parse(forge, headers, body)
    if isinstance(parsed, webhooks.Ping):
        return Answer(200, {"status": "pong"})
    if isinstance(parsed, webhooks.Ignored):
        return ignored(parsed.reason)
    if webhooks.skips_ci(parsed.message):
        return ignored("the commit message asks to skip CI")
    source = source_of(parsed, repository)
    if why := filters.refusal(repository.pipeline.spec.get("on"), source):
        return ignored(why)
    made = trigger(
        repository.pipeline,
        idempotency_key=f"{forge}:{parsed.delivery}"[:200],
        source=source,
        on_created=statuses.owe,
    )
    build = made.build
    body = {"status": "triggered", "build": build.pk, "number": build.number}
    if made.replayed:
        return Answer(200, body | {"status": "replayed"})
    return Answer(201, body)


def source_of(event: "webhooks.Event", repository: Repository) -> Source:
    # The configured clone URL, never the payload's: the agent fetches from where the
    # pipeline's owner said (a fork's pull request through the base's own refs).
    return Source(
        event={"push": Event.PUSH, "tag": Event.TAG}.get(event.kind, Event.PULL_REQUEST),
        sha=event.sha,
        ref=event.ref,
        repository_url=repository.clone_url,
        branch=event.branch,
        tag=event.tag,
        target_branch=event.target_branch,
        pull_request=event.pull_request,
        fork=event.fork,
    )
