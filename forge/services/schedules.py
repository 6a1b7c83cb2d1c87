"""Cron schedules, fired by beat (forge.tasks.fire_schedules, every SCHEDULE_SWEEP_SECONDS).

Why croniter inside our own beat rather than django-celery-beat's database scheduler: beat's
schedule stays in code (one beat, its sweeps as they are), and a tick fires by a trigger
whose idempotency key is the schedule and the tick's time, so two beats, a restarted one or
a sweep sent twice make one build per tick: PostgreSQL's unique key is the arbiter, not the
scheduler. Only the latest tick missed while beat was down fires (forge.cron.due_tick), and a
tick before the schedule existed never does."""

import logging

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from builds.errors import IdempotencyKeyReused
from builds.models import Pipeline
from builds.services.triggering import trigger
from builds.source import Event
from ciproject.errors import CIError
from forge import cron
from forge.models import Repository, Schedule
from forge.services import runs, statuses

log = logging.getLogger(__name__)

SYNCED = ("cron", "timezone", "branch", "variables")


def sync_definitions() -> None:
    """Make each pipeline's `schedules:` rows match its definition: new ones made (from
    now on), removed ones deleted, unchanged ones kept with their last tick."""
    pipelines = Pipeline.objects.filter(
        ~Q(spec__schedules=[]) | Q(schedules__from_definition=True)
    ).distinct()
    for pipeline in pipelines:
        with transaction.atomic():
            rows = Schedule.objects.select_for_update().filter(
                pipeline=pipeline, from_definition=True
            )
            kept = {_fields_of(row): row for row in rows}
            wanted = [_fields(entry) for entry in pipeline.spec.get("schedules", [])]
            for row_key, row in kept.items():
                if row_key not in wanted:
                    row.delete()
            for entry in wanted:
                if entry not in kept:
                    cron_, zone, branch, variables = entry
                    Schedule.objects.create(
                        pipeline=pipeline,
                        from_definition=True,
                        cron=cron_,
                        timezone=zone,
                        branch=branch,
                        variables=dict(variables),
                    )


def _fields(entry: dict) -> tuple:
    variables = tuple(sorted(entry["variables"].items()))
    return (entry["cron"], entry["timezone"], entry.get("branch") or "", variables)


def _fields_of(row: Schedule) -> tuple:
    return _fields({**{name: getattr(row, name) for name in SYNCED}, "variables": row.variables})


def fire_due(now=None) -> int:
    """Fire each enabled schedule whose tick is due; returns how many builds were made."""
    now = now or timezone.now()
    sync_definitions()
    fired = 0
    for schedule in Schedule.objects.filter(enabled=True).select_related("pipeline"):
        after = max(filter(None, [schedule.created_at, schedule.last_tick]))
        try:
            tick = cron.due_tick(schedule.cron, schedule.timezone, after, now)
            fired += tick is not None and fire(schedule, tick)
        except Exception as exc:  # the other schedules still fire
            if isinstance(exc, ValueError):  # cron's own words (a zone gone from tzdata)
                log.warning("schedule %s: no ticks: %s", schedule.pk, exc)
                why = str(exc)
            else:  # a bug: the class only; the text, which may quote anything, is logged
                log.exception("schedule %s: no build", schedule.pk)
                why = f"internal error ({type(exc).__name__}): see the server's log"
            Schedule.objects.filter(pk=schedule.pk).update(last_error=why[:2000])
    return fired


def fire(schedule: Schedule, tick) -> bool:
    """A build for `tick` of `schedule`, once whatever runs this how often; False if this
    tick made none here (fired elsewhere, or failed: it is tried again next sweep)."""
    key = f"schedule:{schedule.pk}:{tick.isoformat()}"
    try:
        repository = Repository.objects.filter(pipeline_id=schedule.pipeline_id).first()
        source = repository and runs.source_for(repository, Event.SCHEDULE, schedule.branch)
        made = trigger(
            schedule.pipeline,
            (schedule.variables or {}),
            idempotency_key=key,
            source=source,
            on_created=statuses.owe,
        )
    except IdempotencyKeyReused:  # another beat fired it with the branch's head of then
        made = None
    except CIError as exc:
        log.warning("schedule %s, tick %s: no build: %s", schedule.pk, tick, exc.detail)
        Schedule.objects.filter(pk=schedule.pk).update(last_error=exc.detail[:2000])
        return False
    fields = {"last_tick": tick, "last_error": ""}
    if made is not None:
        fields["last_build"] = made.build
    Schedule.objects.filter(pk=schedule.pk).filter(
        Q(last_tick__isnull=True) | Q(last_tick__lt=tick)
    ).update(**fields)
    return made is not None and not made.replayed
