"""Setting, replacing and deleting secrets, and which a pipeline's jobs may name. A value goes
in encrypted and comes out only for a job that names it (values_for); every change leaves a
SecretEvent, with names only."""

import json

from django.db import connection, transaction

import audit
from agents.models import Agent
from builds.definition import MAX_VARIABLE_VALUE, secret_name_refusal
from builds.models import JobRun, Pipeline
from builds.statuses import RunStatus
from ciproject.errors import CIError
from forge.models import Repository
from vault import crypto, sealing, tokens
from vault.errors import InvalidSecret, SecretNotFound
from vault.models import SealedSecrets, Secret, SecretEvent, SecretScope, owned_by, owner_label

# Masking a shorter value would mask everything: `ab` is in every other word.
MIN_VALUE_LENGTH = 4

Owner = Pipeline | SecretScope


def secrets_of(owner: Owner):
    return Secret.objects.filter(**owned_by(owner))


def _person(user):
    """Who acts, for the trail: nobody for the system or an anonymous request."""
    return user if user is not None and user.is_authenticated else None


def check_name(name) -> str:
    if why := secret_name_refusal(name):
        raise InvalidSecret(why)
    return name


def check_value(name: str, value) -> str:
    if not isinstance(value, str):
        raise InvalidSecret(f"{name}: the value must be text")
    if "\0" in value:
        raise InvalidSecret(f"{name}: the value holds a NUL character")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate: not text a step could print
        raise InvalidSecret(f"{name}: the value is not valid Unicode text") from None
    if len(value.strip()) < MIN_VALUE_LENGTH:
        raise InvalidSecret(
            f"{name}: the value is shorter than {MIN_VALUE_LENGTH} characters, too short to be"
            " masked in logs without masking everything else"
        )
    if size > MAX_VARIABLE_VALUE:
        raise InvalidSecret(f"{name}: the value is over {MAX_VARIABLE_VALUE} bytes")
    return value


@transaction.atomic
def set_secret(owner: Owner, name: str, value: str, user=None, source: str = "") -> bool:
    """Set or replace a secret; True if it replaced one."""
    check_value(check_name(name), value)
    user = _person(user)
    secret, made = Secret.objects.select_for_update().get_or_create(
        **owned_by(owner),
        name=name,
        defaults={"ciphertext": crypto.encrypt(value), "updated_by": user},
    )
    if not made:
        secret.ciphertext, secret.updated_by = crypto.encrypt(value), user
        secret.save(update_fields=["ciphertext", "updated_by", "updated_at"])
    action = SecretEvent.Action.SET if made else SecretEvent.Action.REPLACED
    _record(action, secret, user, source)
    audit.record("secret.set", secret, replaced=not made)
    return not made


@transaction.atomic
def delete_secret(owner: Owner, name: str, user=None, source: str = "") -> None:
    secret = secrets_of(owner).select_for_update().filter(name=name).first()
    if secret is None:
        raise SecretNotFound(f"{owner_label(owner)} has no secret {str(name)[:130]!r}")
    audit.record("secret.delete", secret)  # while it has its id
    secret.delete()
    _record(SecretEvent.Action.DELETED, secret, _person(user), source)


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


def server_value(pipeline: Pipeline, name: str) -> str:
    """A secret the server itself uses for `pipeline` (the token it posts commit statuses
    with): never given to a build, so not in the trail. Raises SecretNotFound."""
    secret = available_to(pipeline).get(name)
    if secret is None:
        raise SecretNotFound(f"no secret {name!r} for pipeline {pipeline.name}")
    return crypto.decrypt(secret.ciphertext)


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
            audit.record("secret.rotate", secret)
            count += 1
    return count


def _record(action: str, secret: Secret, user, source: str) -> None:
    SecretEvent.objects.create(
        action=action, name=secret.name, owner=secret.owner, user=user, source=source
    )


def names_for(job: JobRun) -> list[str]:
    """The secrets a job names in its pipeline's definition (as its build has it)."""
    return job.definition.get("secrets", [])


def context(job_id: int, attempt: int) -> bytes:
    return f"job {job_id} attempt {attempt}".encode()


def seal_for_job(job_id: int, attempt: int) -> bool:
    """Seal the secrets a running job attempt names, and its credential (vault.tokens), for
    the agent process running it (the controller, when that agent asks), once per attempt:
    asked again, it changes nothing. False, sealing nothing, for an attempt that is not
    running (stale) or an agent whose key is not registered yet (its next heartbeat puts its
    row back; it asks again)."""
    with transaction.atomic():  # the job's row locked: one seal at a time for it
        job = JobRun.objects.select_for_update(no_key=True, of=("self",))
        job = job.select_related("build__pipeline").filter(
            pk=job_id, attempt=attempt, status=RunStatus.RUNNING
        )
        job = job.first()
        if job is None:
            return False
        key = Agent.objects.filter(name=job.agent).values_list("public_key", flat=True).first()
        if not key:
            return False
        if SealedSecrets.objects.filter(job=job, attempt=attempt).exists():
            return True  # sealed already (this is a second ask)
        sealed, error = b"", ""
        try:  # an untrusted build's job runs without them
            names = [] if job.build.untrusted else names_for(job)
            values = values_for(job.build.pipeline, names, job.build)
            given = {"secrets": values, "token": tokens.for_attempt(job_id, attempt)}
            given["git"] = _git_credentials(job)
            sealed = sealing.seal(key, json.dumps(given).encode(), context(job_id, attempt))
        except CIError as exc:  # a secret gone, no key to decrypt with: the job says why
            error = exc.detail
        SealedSecrets.objects.create(job=job, attempt=attempt, sealed=sealed, error=error)
    return True


def _git_credentials(job: JobRun) -> dict | None:
    """What git clones the build's commit with (agents.process.checkout): the repository's
    clone secret, for a job that checks out; never in a step's environment. An untrusted
    build gets it too: it reads the same repository, and no step sees the value."""
    if not job.build.source or job.definition.get("checkout") is False:
        return None
    repository = Repository.objects.filter(pipeline_id=job.build.pipeline_id).first()
    if repository is None or not repository.clone_secret:
        return None
    [password] = values_for(job.build.pipeline, [repository.clone_secret], job.build).values()
    return {"username": repository.git_username, "password": password}


def take_sealed(job_id: int, attempt: int) -> tuple[bytes, str] | None:
    """The agent's side: what was sealed for this attempt (and why not, if it was not),
    emptied as it is taken, once; None while the controller has not answered."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE vault_sealedsecrets new SET sealed = '', taken_at = now()"
            " FROM vault_sealedsecrets old WHERE new.id = old.id AND new.job_id = %s"
            " AND new.attempt = %s AND new.taken_at IS NULL RETURNING old.sealed, old.error",
            [job_id, attempt],
        )
        found = cursor.fetchone()
    return None if found is None else (bytes(found[0]), found[1])
