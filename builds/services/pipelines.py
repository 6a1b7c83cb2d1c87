"""Creating and editing pipelines."""

import re

from django.db import IntegrityError, transaction

from builds.definition import parse_definition
from builds.errors import InvalidPipeline, PipelineNameTaken
from builds.models import Pipeline
from concurrency.models import ConcurrencyPolicy

PIPELINE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def validate_pipeline_name(name) -> str:
    if not isinstance(name, str) or not PIPELINE_NAME_RE.fullmatch(name):
        raise InvalidPipeline(
            "name: 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def save_pipeline(name: str, definition: str, pipeline: Pipeline | None = None) -> Pipeline:
    """Create a pipeline, or update `pipeline`; nothing is stored unless all of it is valid."""
    name = validate_pipeline_name(name)
    spec = parse_definition(definition)
    creating = pipeline is None or pipeline.pk is None
    pipeline = pipeline or Pipeline()
    pipeline.name, pipeline.definition, pipeline.spec = name, definition, spec
    if spec["concurrency"] is not None:  # else the policy chosen in the admin stays
        pipeline.policy = ConcurrencyPolicy.objects.filter(name=spec["concurrency"]).first()
        if pipeline.policy is None:
            raise InvalidPipeline(
                f"concurrency: there is no concurrency policy named {spec['concurrency']!r}"
            )
    # An update writes only what it changes: this row may be stale, and writing back its
    # last_build_number would undo the builds triggered meanwhile.
    fields = None if creating else ["name", "definition", "spec", "policy", "updated_at"]
    try:
        with transaction.atomic():
            pipeline.save(update_fields=fields)
    except IntegrityError:
        raise PipelineNameTaken(f"name: a pipeline named {name!r} already exists") from None
    return pipeline
