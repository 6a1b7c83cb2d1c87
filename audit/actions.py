"""The actions the audit trail records: one stable name for each state change a person or a
token makes. The names are stored: never rename one, add a new one."""

from django.db import models


class Action(models.TextChoices):
    BUILD_TRIGGER = "build.trigger"
    BUILD_CANCEL = "build.cancel"
    BUILD_RETRY = "build.retry"
    STEP_RETRY = "step.retry"
    PIPELINE_CREATE = "pipeline.create"
    PIPELINE_EDIT = "pipeline.edit"
    PIPELINE_DELETE = "pipeline.delete"
    POLICY_CREATE = "policy.create"
    POLICY_EDIT = "policy.edit"
    POLICY_DELETE = "policy.delete"
    SECRET_SET = "secret.set"
    SECRET_DELETE = "secret.delete"
    SECRET_ROTATE = "secret.rotate"  # re-encrypted under the first key (`secret rotate`)
    # Labelled with the token's name, never its prefix or value (tokens.services).
    TOKEN_CREATE = "token.create"
    TOKEN_REVOKE = "token.revoke"
    AGENT_DRAIN = "agent.drain"
    AGENT_UNDRAIN = "agent.undrain"
    REPOSITORY_CREATE = "repository.create"
    REPOSITORY_EDIT = "repository.edit"
    REPOSITORY_DELETE = "repository.delete"
    REPOSITORY_ROTATE_SECRET = "repository.rotate_secret"
    SCHEDULE_CREATE = "schedule.create"
    SCHEDULE_EDIT = "schedule.edit"
    SCHEDULE_DELETE = "schedule.delete"
    # A shared secret scope: which pipelines may use its secrets.
    SCOPE_CREATE = "scope.create"
    SCOPE_EDIT = "scope.edit"
    SCOPE_DELETE = "scope.delete"
    # Build-variable partitions made ahead or dropped by a person (`partitions` command);
    # beat's own upkeep is the system's.
    PARTITION_CREATE = "partition.create"
    PARTITION_DROP = "partition.drop"
