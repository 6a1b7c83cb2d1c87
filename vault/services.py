"""Setting, replacing and deleting secrets, and which a pipeline's jobs may name. A value goes
in encrypted and comes out only for a job that names it (values_for); every change leaves a
SecretEvent, with names only."""

import json

from django.db import transaction

from agents.models import Agent
from builds.definition import (
    MAX_VARIABLE_NAME,
    MAX_VARIABLE_VALUE,
    VARIABLE_NAME_RE,
    is_reserved_variable_name,
)
from builds.models import JobRun, Pipeline
from builds.statuses import RunStatus
from vault import crypto, sealing
from vault.errors import InvalidSecret, SecretNotFound
from vault.models import SealedSecrets, Secret, SecretEvent, SecretScope

# Masking a shorter value would mask everything: `ab` is in every other word.
MIN_VALUE_LENGTH = 4

Owner = Pipeline | SecretScope


def secrets_of(owner: Owner):
    if isinstance(owner, Pipeline):
        return Secret.objects.filter(pipeline=owner)
    return Secret.objects.filter(scope=owner)


def check_name(name) -> str:
    if not isinstance(name, str) or not VARIABLE_NAME_RE.fullmatch(name):
        raise InvalidSecret(
            f"{str(name)[:40]!r} is not a valid secret name ([A-Za-z_][A-Za-z0-9_]*)"
        )
    if len(name) > MAX_VARIABLE_NAME:
        raise InvalidSecret(
            f"{name[:40]}...: a secret's name is at most {MAX_VARIABLE_NAME} characters"
        )
    if is_reserved_variable_name(name):
        raise InvalidSecret(f"{name}: reserved (set by the agent, or changes how the shell runs)")
    return name


def check_value(name: str, value) -> str:
    if not isinstance(value, str):
        raise InvalidSecret(f"{name}: the value must be text")
    if "\0" in value:
        raise InvalidSecret(f"{name}: the value holds a NUL character")
    if len(value.strip()) < MIN_VALUE_LENGTH:
        raise InvalidSecret(
            f"{name}: the value is shorter than {MIN_VALUE_LENGTH} characters, too short to be"
            " masked in logs without masking everything else"
        )
    if len(value.encode()) > MAX_VARIABLE_VALUE:
        raise InvalidSecret(f"{name}: the value is over {MAX_VARIABLE_VALUE} bytes")
    return value


@transaction.atomic
def set_secret(owner: Owner, name: str, value: str, user=None, source: str = "") -> bool:
    """Set or replace a secret; True if it replaced one."""
    check_value(check_name(name), value)
    user = user if user is not None and user.is_authenticated else None
    kind = "pipeline" if isinstance(owner, Pipeline) else "scope"
    secret, made = Secret.objects.select_for_update().get_or_create(
        **{kind: owner, "name": name},
        defaults={"ciphertext": crypto.encrypt(value), "updated_by": user},
    )
    if not made:
        secret.ciphertext, secret.updated_by = crypto.encrypt(value), user
        secret.save(update_fields=["ciphertext", "updated_by", "updated_at"])
    action = SecretEvent.Action.SET if made else SecretEvent.Action.REPLACED
    _record(action, secret, user, source)
    return not made


@transaction.atomic
def delete_secret(owner: Owner, name: str, user=None, source: str = "") -> None:
    secret = secrets_of(owner).select_for_update().filter(name=name).first()
    if secret is None:
        raise SecretNotFound(f"{_owner_text(owner)} has no secret {str(name)[:130]!r}")
    secret.delete()
    user = user if user is not None and user.is_authenticated else None
    _record(SecretEvent.Action.DELETED, secret, user, source)


def names_of(owner: Owner) -> list[str]:
    return list(secrets_of(owner).values_list("name", flat=True))


def available_to(pipeline: Pipeline) -> dict[str, Secret]:
    """The secrets a job of `pipeline` may name: its own, then those of the scopes it may
    use (its own win; between scopes, the first by name)."""
    found: dict[str, Secret] = {}
    own = Secret.objects.filter(pipeline=pipeline)
    shared = Secret.objects.filter(scope__pipelines=pipeline).order_by("scope__name", "name")
    for secret in [*own, *shared]:
        found.setdefault(secret.name, secret)
    return found


def values_for(pipeline: Pipeline, names: list[str], build=None) -> dict[str, str]:
    """The decrypted values of `names` for a job of `pipeline` (each recorded as delivered
    to `build`). Raises SecretNotFound naming the first that is gone."""
    available = available_to(pipeline)
    missing = [name for name in names if name not in available]
    if missing:
        raise SecretNotFound(
            f"no secret {missing[0]!r} for pipeline {pipeline.name}"
            f" (its secrets: {', '.join(sorted(available)) or 'none'})"
        )
    values = {name: crypto.decrypt(available[name].ciphertext) for name in names}
    SecretEvent.objects.bulk_create(
        SecretEvent(action=SecretEvent.Action.DELIVERED, name=name, build=build,
                    owner=available[name].owner, source="job")
        for name in names
    )  # fmt: skip
    return values


def rotate_all() -> int:
    """Re-encrypt every secret under the first key; returns how many."""
    count = 0
    for secret_id in Secret.objects.values_list("pk", flat=True).iterator():
        with transaction.atomic():
            secret = Secret.objects.select_for_update().filter(pk=secret_id).first()
            if secret is None:
                continue
            secret.ciphertext = crypto.rotate(secret.ciphertext)
            secret.save(update_fields=["ciphertext"])
            _record(SecretEvent.Action.ROTATED, secret, None, "cli")
            count += 1
    return count


def _owner_text(owner: Owner) -> str:
    return f"pipeline {owner.name}" if isinstance(owner, Pipeline) else f"scope {owner.name}"


def _record(action: str, secret: Secret, user, source: str) -> None:
    SecretEvent.objects.create(
        action=action, name=secret.name, owner=secret.owner, user=user, source=source
    )


def names_for(job: JobRun) -> list[str]:
    """The secrets a job names in its pipeline's definition (as its build has it)."""
    wanted = job.matrix_of or job.key
    for stage in job.build.spec["stages"]:
        for spec in stage["jobs"]:
            if spec["id"] == wanted:
                return spec.get("secrets", [])
    return []


def context(job_id: int, attempt: int) -> bytes:
    return f"job {job_id} attempt {attempt}".encode()


def seal_for_job(job_id: int, attempt: int) -> bool:
    """Seal the secrets a running job attempt names for the agent process running it (the
    controller, when that agent asks). False, sealing nothing, for an attempt that is not
    running (stale) or an agent whose key is not registered yet (its row is put back by its
    next heartbeat; it asks again)."""
    job = JobRun.objects.select_related("build__pipeline").filter(
        pk=job_id, attempt=attempt, status=RunStatus.RUNNING
    )
    job = job.first()
    if job is None:
        return False
    key = Agent.objects.filter(name=job.agent).values_list("public_key", flat=True).first()
    if not key:
        return False
    sealed, error = b"", ""
    try:
        values = values_for(job.build.pipeline, names_for(job), job.build)
        sealed = sealing.seal(key, json.dumps(values).encode(), context(job_id, attempt))
    except SecretNotFound as exc:
        error = exc.detail
    SealedSecrets.objects.update_or_create(
        job_id=job_id, attempt=attempt, defaults={"sealed": sealed, "error": error}
    )
    return True


def take_sealed(job_id: int, attempt: int) -> tuple[bytes, str] | None:
    """The agent's side: what was sealed for this attempt (and why not, if it was not),
    removed as it is taken; None while the controller has not answered."""
    with transaction.atomic():
        row = SealedSecrets.objects.select_for_update().filter(job_id=job_id, attempt=attempt)
        found = row.values_list("sealed", "error").first()
        if found is not None:
            row.delete()
    return None if found is None else (bytes(found[0]), found[1])
