"""Triggering a build: its number, variables and status tree, admitted by its pipeline's
concurrency policy, and the jobs that wait for nothing queued if it may run."""

import hashlib
import json
import re
from collections.abc import Callable
from contextlib import suppress
from typing import NamedTuple

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

import audit
from builds import parameters
from builds.definition import DEFAULT_CLEANUP_TIMEOUT, normalize_variables
from builds.errors import (
    BuildAlreadyFinished,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    InvalidPriority,
    VariablePartitionMissing,
)
from builds.models import Build, BuildVariable, JobRun, Pipeline, StepRun
from builds.services.cancellation import cancel_at_once, request_cancel
from builds.services.progress import advance_locked
from builds.source import Source
from builds.statuses import BuildStatus
from ciproject.log_format import log_context
from ciproject.transactions import retried_on_conflict
from concurrency import services as concurrency
from concurrency.models import ConcurrencyPolicy

NO_PARTITION_FOR_ROW = "23514"  # check_violation: "no partition of relation ... for row"


class Triggered(NamedTuple):
    build: Build
    replayed: bool  # made by an earlier trigger with the same idempotency key


IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, as a UUID is


def trigger_build(
    pipeline: Pipeline, variables=None, user=None, idempotency_key="", priority=None
) -> Build:
    """trigger()'s build, for callers that do not ask whether it was replayed."""
    return trigger(pipeline, variables, user, idempotency_key, priority).build


@retried_on_conflict
def trigger(
    pipeline: Pipeline,
    variables=None,
    user=None,
    idempotency_key="",
    priority=None,
    source: Source | None = None,
    on_created: Callable[[Build], None] | None = None,
) -> Triggered:
    """Create build N+1 of `pipeline` with its variables and status tree, admit it by the
    pipeline's concurrency policy, and queue the jobs that wait for nothing if it may run.
    Bad variables raise InvalidVariables, a full queue PipelineQueueFull, before anything is
    stored.

    With an `idempotency_key`, the same trigger again (a client retrying after a lost
    answer, a form sent twice) returns the build the first one made, `replayed`;
    the key with other variables raises IdempotencyKeyReused.

    `priority` (None: the pipeline's) places it in its group's queue, up to the pipeline's
    max-priority (InvalidPriority beyond it). A `source` is the commit it builds (a forge's
    event, a schedule, a run-now): its CI_* values join the concurrency key, and a fork's
    pull request makes the build untrusted. `on_created(build)` runs in the transaction
    that makes the build (what a caller records with it commits or rolls back with it)."""
    overrides = normalize_variables({} if variables is None else variables)
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or priority < 0
    ):
        raise InvalidPriority("priority: a whole number from 0", priority=priority)
    if idempotency_key and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise InvalidIdempotencyKey(
            "an idempotency key is 1 to 200 printable ASCII characters, without spaces"
            " (a UUID, say)"
        )
    try:
        made = _trigger(pipeline, overrides, user, idempotency_key, priority, source, on_created)
    except IntegrityError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != NO_PARTITION_FOR_ROW:
            raise
        raise VariablePartitionMissing(
            "no partition of the variable table holds builds created now; nothing was stored."
            " Run `manage.py partitions ensure` (beat runs it every hour)"
        ) from None
    return made


def _trigger(
    pipeline: Pipeline,
    overrides: dict[str, str],
    user,
    key: str,
    priority: int | None,
    source: Source | None,
    on_created: Callable[[Build], None] | None,
) -> Triggered:
    # Asking for the pipeline's own priority is the same trigger as not asking.
    own = (pipeline.spec or {}).get("priority", 0)
    server = source.ci_variables() if source else {}
    given = {**overrides, **server}  # (CI_* names are reserved: no override has one)
    fingerprint = _fingerprint(given, None if priority == own else priority) if key else ""
    with transaction.atomic():
        if key and (earlier := _earlier_trigger(pipeline.pk, key, fingerprint)):
            return Triggered(earlier, replayed=True)
        number, spec, policy = _next_build_number(pipeline.pk)
        defaults = parameters.bind(spec, overrides)  # refused: rolled back, number and all
        priority = _priority(spec, priority)
        now = timezone.now()
        build = Build(
            pipeline=pipeline,
            number=number,
            status=BuildStatus.RUNNING,
            spec=spec,
            triggered_by=user if user and user.is_authenticated else None,
            created_at=now,
            idempotency_key=key,
            idempotency_fingerprint=fingerprint,
            priority=priority,
            # (absent from definitions stored before)
            untrusted=spec.get("untrusted", False) or bool(source and source.fork),
            source=source.as_dict() if source else {},
        )
        if policy is not None:
            _admit(build, policy, {**defaults, **overrides, **server})
        if build.status == BuildStatus.RUNNING:
            build.started_at = now
        else:
            build.enqueued_at = now
        build.save(force_insert=True)
        with log_context(build_id=build.pk):
            _store_variables(build, defaults, "pipeline", skip=overrides)
            _store_variables(build, overrides, "trigger")
            made = _create_tree(build, spec)
            audit.record("build.trigger", build, variables=sorted(overrides), priority=priority)
            if on_created:
                on_created(build)
            if build.status == BuildStatus.RUNNING:
                advance_locked(build, made)
    return Triggered(build, replayed=False)


def _fingerprint(overrides: dict[str, str], priority: int | None) -> str:
    given = overrides if priority is None else [overrides, priority]
    return hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest()


def _priority(spec: dict, asked: int | None) -> int:
    """The build's priority: the pipeline's, or what its trigger asked for within the
    pipeline's max-priority."""
    own = spec.get("priority", 0)  # absent from definitions stored before
    if asked is None:
        return own
    highest = spec.get("max_priority", own)
    if asked > highest:
        raise InvalidPriority(
            f"priority: {asked} is above this pipeline's max-priority of {highest}",
            priority=asked,
            max_priority=highest,
        )
    return asked


def _earlier_trigger(pipeline_id: int, key: str, fingerprint: str) -> Build | None:
    """The build an earlier trigger with this key made. The pipeline's row is locked first,
    as the trigger's numbering does, so a concurrent trigger with the key waits for this one."""
    Pipeline.objects.select_for_update(no_key=True).filter(pk=pipeline_id).values_list("pk").first()
    build = Build.objects.filter(pipeline_id=pipeline_id, idempotency_key=key).first()
    if build is None:
        return None
    if build.idempotency_fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            f"build #{build.number} was triggered with this idempotency key and other"
            " variables; nothing was done. Use a new key for a new build",
            build=build.pk,
            number=build.number,
        )
    return build


# The number's UPDATE joined to the pipeline's policy (its columns as the model has them).
_POLICY_FIELDS = ConcurrencyPolicy._meta.concrete_fields
_POLICY_COLUMNS = ", ".join(f"p.{f.column}" for f in _POLICY_FIELDS)
_POLICY_NAMES = [f.attname for f in _POLICY_FIELDS]
_NUMBER_AND_POLICY = (
    "WITH numbered AS (UPDATE builds_pipeline SET last_build_number = last_build_number + 1"
    " WHERE id = %s RETURNING last_build_number, spec, policy_id)"
    f" SELECT last_build_number, spec, policy_id, {_POLICY_COLUMNS}"
    " FROM numbered LEFT JOIN concurrency_concurrencypolicy p ON p.id = policy_id"
)


def _next_build_number(pipeline_id: int) -> tuple[int, dict, ConcurrencyPolicy | None]:
    # The UPDATE row-locks the pipeline until commit, so concurrent triggers are serialized
    # here, and the spec and policy are read in the same statement. The join reads the
    # policy as of the statement's start: a policy made and given to the pipeline while the
    # UPDATE waited for the lock is not in it yet, and is read apart.
    with connection.cursor() as cursor:
        cursor.execute(_NUMBER_AND_POLICY, [pipeline_id])
        number, spec, policy_id, *policy_row = cursor.fetchone()
    if policy_id is None:
        policy = None
    elif policy_row[0] is None:
        policy = ConcurrencyPolicy.objects.get(pk=policy_id)
    else:
        policy = ConcurrencyPolicy.from_db(connection.alias, _POLICY_NAMES, policy_row)
    return number, json.loads(spec) if isinstance(spec, str) else spec, policy


def _admit(build: Build, policy: ConcurrencyPolicy, variables: dict[str, str]) -> None:
    build.policy = policy
    build.concurrency_group = concurrency.group_key(policy, build.pipeline, variables)
    concurrency.lock_group(build.concurrency_group)
    if policy.cancel_in_progress:
        group = Build.objects.filter(concurrency_group=build.concurrency_group)
        for other in group.filter(status=BuildStatus.QUEUED):
            cancel_at_once(other, f"cancelled by build #{build.number} (cancel in progress)")
        for other_id in group.filter(status=BuildStatus.RUNNING).values_list("id", flat=True):
            # suppress: it ended meanwhile, nothing to cancel. unrecorded: the policy cancels
            # it, not the person triggering (their trigger's event and its reason tell it).
            with suppress(BuildAlreadyFinished), audit.unrecorded():
                request_cancel(other_id)  # the real path: its steps are stopped on the agents

    def evict(oldest: Build) -> None:
        cancel_at_once(
            oldest,
            f"evicted from the full queue of group {build.concurrency_group!r}"
            f" by build #{build.number} of {build.pipeline.name!r}",
        )

    build.status = concurrency.admit(build, policy, on_evict=evict)


def _store_variables(build: Build, variables: dict, source: str, skip=()) -> None:
    BuildVariable.objects.bulk_create(
        BuildVariable(
            build=build, build_created_at=build.created_at, name=k, value=v, source=source
        )
        for k, v in variables.items()
        if k not in skip
    )


def _create_tree(build: Build, spec: dict) -> list[JobRun]:
    jobs, steps = [], []
    reuse = {j["id"]: j.get("reuse") for stage in spec["stages"] for j in stage["jobs"]}

    def root(key: str) -> str:  # `c` reuses `b` which reuses `a`: all run on a's agent
        while reuse.get(key):
            key = reuse[key]
        return key

    leased = {root(key) for key, target in reuse.items() if target}
    for stage_index, stage in enumerate(spec["stages"]):
        for job_spec in stage["jobs"]:
            key = job_spec["id"]
            matrix = job_spec.get("matrix")  # absent from definitions stored before
            for run in matrix["runs"] if matrix else [None]:
                job = JobRun(
                    build=build,
                    stage_index=stage_index,
                    stage_name=stage["name"],
                    key=run["key"] if run else key,
                    runs_on=run["runs_on"] if run else job_spec["runs_on"],
                    needs=job_spec.get("needs"),
                    condition=job_spec.get("if") or "",
                    matrix_of=key if run else "",
                    matrix=run["values"] if run else None,
                    reuse_of=root(key) if reuse.get(key) else "",
                    takes_lease=key in leased,
                    timeout=job_spec.get("timeout"),
                    cleanup_timeout=job_spec.get("cleanup_timeout", DEFAULT_CLEANUP_TIMEOUT),
                )
                jobs.append(job)
                steps.extend((job, index, s) for index, s in enumerate(job_spec["steps"]))
    JobRun.objects.bulk_create(jobs)
    StepRun.objects.bulk_create(
        StepRun(
            job=job,
            index=index,
            name=s["name"],
            command=s["run"],
            condition=s.get("if") or "",
            timeout=s["timeout"],
            max_retries=s["retry"],
            retry_rule=s.get("retry_rule"),
            continue_on_error=s["continue_on_error"],
            kill_grace=s.get("kill_grace"),
            max_processes=s.get("max_processes"),  # absent from definitions stored before
            max_memory=s.get("max_memory"),
        )
        for job, index, s in steps
    )
    return jobs
