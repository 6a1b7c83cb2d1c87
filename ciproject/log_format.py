"""Log lines, and the ids of what they are about.

While a process works on one build, job or step, `log_context(build_id=..., job_id=...,
attempt=..., step_id=..., step_attempt=...)` holds their ids (in a context variable: per
thread, per asyncio task), and `ContextFilter`, on the handlers in settings.LOGGING, copies
them onto every record logged meanwhile, from any logger (Celery's and Django's included).
Ids a log call gives itself (`extra={"build_id": ...}`) win.

`JsonFormatter` (LOG_FORMAT=json) writes one JSON object a line; `PlainFormatter` (the
default) writes text with the ids in brackets: `[build 12 job 40/1 step 7/2]`.
"""

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType

from celery.signals import celeryd_init

# From the outermost to the innermost: (id, its attempt, its word in plain text); a job's
# attempt is the job's, a step's the step's.
LEVELS = (
    ("build_id", None, "build"),
    ("job_id", "attempt", "job"),
    ("step_id", "step_attempt", "step"),
)
ID_FIELDS = tuple(name for id_name, attempt, _ in LEVELS for name in (id_name, attempt) if name)

_ids: ContextVar[Mapping[str, int]] = ContextVar("ciproject_log_ids", default=MappingProxyType({}))


@contextmanager
def log_context(**ids: int | None) -> Iterator[None]:
    """Every line logged inside carries these ids, besides those of the enclosing contexts.
    None values are left out (an id not known yet)."""
    unknown = set(ids) - set(ID_FIELDS)
    if unknown:
        raise TypeError(f"log_context: unknown ids {sorted(unknown)}; known: {ID_FIELDS}")
    token = _ids.set({**_ids.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _ids.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context's ids onto the record. An id the record already has (from `extra`)
    wins; and when it names another build (job, step) than the context's, the context's ids
    below it are not added either: they belong to the other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _ids.get()
        if not context:
            return True
        for id_name, attempt, _ in LEVELS:
            own = getattr(record, id_name, None)
            if own is not None and id_name in context and own != context[id_name]:
                break
            for name in (id_name, attempt):
                if name and getattr(record, name, None) is None and name in context:
                    setattr(record, name, context[name])
        return True


def record_ids(record: logging.LogRecord) -> dict[str, int]:
    ids = ((name, getattr(record, name, None)) for name in ID_FIELDS)
    return {name: value for name, value in ids if value is not None}


def _utc_iso(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, process, pid,
    thread, the ids the line is about, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
            "thread": record.threadName,
            **record_ids(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def ids_label(ids: dict[str, int]) -> str:
    """`build 12 job 40/1 step 7/2`: a job or step with its attempt."""
    parts = []
    for name, attempt, word in LEVELS:
        if name in ids:
            suffix = f"/{ids[attempt]}" if attempt in ids else ""
            parts.append(f"{word} {ids[name]}{suffix}")
        elif attempt in ids:
            parts.append(f"{word} attempt {ids[attempt]}")
    return " ".join(parts)


class PlainFormatter(logging.Formatter):
    """Text; `%(id_label)s` in the format is `[build 12 job 40/1] ` (or nothing), e.g.
    `asctime LEVEL logger [build 12 job 40/1] message`."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        label = ids_label(record_ids(record))
        record.id_label = f"[{label}] " if label else ""  # as Formatter sets record.asctime
        return super().formatMessage(record)


def _celery_worker_in_json(sender=None, instance=None, **kwargs) -> None:
    """When every line must be JSON: leave out the start-up banner a Celery worker prints
    straight to stdout, and send warnings through logging before the worker's first one
    (Celery does from its logging set-up on, a moment later). A worker process imports this
    module, through settings.LOGGING, before its Worker is made. Celery still writes one
    line of its own at shutdown (`worker: Warm shutdown (MainProcess)`), and `celery beat`
    prints a banner unless run with `celery -q`."""
    from django.conf import settings

    if instance is not None and getattr(settings, "LOG_FORMAT", "plain") == "json":
        instance.quiet = True
        logging.captureWarnings(True)


celeryd_init.connect(_celery_worker_in_json, weak=False, dispatch_uid="ciproject.log_format")
