"""Creating and editing pipelines."""

import re

from django.db import IntegrityError, transaction

import audit
from access import rules as access
from access.errors import PolicyNotAllowed, TeamNotAllowed
from access.models import Role, Team
from builds.definition import parse_definition
from builds.errors import InvalidPipeline, PipelineNameTaken
from builds.models import Pipeline
from concurrency.models import ConcurrencyPolicy
from vault import services as vault

PIPELINE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def validate_pipeline_name(name) -> str:
    if not isinstance(name, str) or not PIPELINE_NAME_RE.fullmatch(name):
        raise InvalidPipeline(
            "name: 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


KEEP = object()  # save_pipeline's policy: leave it as it is
AUDITED = ["name", "definition", "policy", "teams"]  # an edit's changed fields, for the trail


def policy_named_in(spec: dict) -> ConcurrencyPolicy | None:
    """The policy the definition names with `concurrency:`, if any; an unknown name is
    invalid."""
    name = spec["concurrency"]
    if name is None:
        return None
    policy = ConcurrencyPolicy.objects.filter(name=name).first()
    if policy is None:
        raise InvalidPipeline(f"concurrency: there is no concurrency policy named {name!r}")
    return policy


def check_secrets_named(spec: dict, pipeline: Pipeline | None) -> None:
    """Each secret a job names must be one the pipeline has (its own, or a scope's it may
    use): a new pipeline has none until they are set."""
    available = sorted(vault.available_to(pipeline)) if pipeline else []
    for s, stage in enumerate(spec["stages"]):
        for j, job in enumerate(stage["jobs"]):
            for n, name in enumerate(job.get("secrets", [])):
                if name not in available:
                    raise InvalidPipeline(
                        f"stages[{s}].jobs[{j}].secrets[{n}]: no secret {name!r} for this"
                        f" pipeline (its secrets: {', '.join(available) or 'none'}; set one"
                        " with PUT /api/pipelines/ID/secrets/NAME/ or `manage.py secret set`)"
                    )


def check_policy(editor, previous_policy_id, policy) -> None:
    """An editor attaches only a policy they may use; one already attached stays."""
    changed = policy is not None and policy.pk != previous_policy_id
    if editor is not None and changed and not access.may_use_policy(editor, policy):
        raise PolicyNotAllowed(
            f"concurrency: you may not attach the policy {policy.name!r}"
            " (ask staff to open it to your team)"
        )


def check_teams(editor, before, after) -> None:
    """An editor adds a pipeline to, or takes it from, only teams they maintain (staff: any)."""
    if editor is None or access.everywhere(editor, access.EDIT):
        return
    maintained = Team.objects.filter(
        memberships__user=editor, memberships__role__gte=Role.MAINTAINER
    )
    maintained = set(maintained.values_list("pk", flat=True))
    for team in sorted(set(before) ^ set(after), key=lambda t: t.name):
        if team.pk not in maintained:
            raise TeamNotAllowed(f"teams: you are not a maintainer of {team.name!r}")


def save_pipeline(
    name: str,
    definition: str,
    pipeline: Pipeline | None = None,
    policy=KEEP,
    editor=None,
    teams=None,
) -> Pipeline:
    """Create a pipeline, or update `pipeline`; nothing is stored unless all of it is valid.
    Its policy is the one the definition names, else `policy` (chosen in the admin), else
    the one it had. `editor`, the person saving it (None: the server's own commands), must
    be allowed the policy it gets, if that changes, and the `teams` it is given (a list:
    the pipeline's teams become those)."""
    name = validate_pipeline_name(name)
    spec = parse_definition(definition)
    named = policy_named_in(spec)
    creating = pipeline is None or pipeline.pk is None
    check_secrets_named(spec, None if creating else pipeline)
    pipeline = pipeline or Pipeline()
    previous_policy_id = pipeline.policy_id
    pipeline.name, pipeline.definition, pipeline.spec = name, definition, spec
    if named is not None:
        pipeline.policy = named
    elif policy is not KEEP:
        pipeline.policy = policy
    check_policy(editor, previous_policy_id, pipeline.policy)
    if teams is not None:
        check_teams(editor, [] if creating else list(pipeline.teams.all()), teams)
    # An update writes only what it changes: this row may be stale, and writing back its
    # last_build_number would undo the builds triggered meanwhile.
    fields = None if creating else ["name", "definition", "spec", "policy", "updated_at"]
    try:
        with transaction.atomic():
            before = audit.stored(pipeline, AUDITED)
            pipeline.save(update_fields=fields)
            if teams is not None:
                pipeline.teams.set(teams)
            audit.record_save("pipeline", pipeline, before, AUDITED)
    except IntegrityError:
        raise PipelineNameTaken(f"name: a pipeline named {name!r} already exists") from None
    return pipeline
