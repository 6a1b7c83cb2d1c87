"""Step logs: chunks the agents append, and the notes the server adds after them. Each
append notifies LOG_CHANNEL with "<step id>:<attempt>" on commit, which wakes the step's
followers (builds.logstream); the table stays the truth."""

from django.db import connection, transaction

from builds.models import StepLogChunk, StepRun

LATE_NOTE_SEQ = 1_000_000  # a note the server adds to a step's log sorts after the agent's
LOG_CHANNEL = "step_log"

_APPEND = f"""
WITH added AS (
    INSERT INTO {StepLogChunk._meta.db_table} (step_id, attempt, seq, text)
    VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1
)
SELECT pg_notify('{LOG_CHANNEL}', %s) FROM added
"""  # one round trip; a chunk already there notifies no one


def append_log(step_id: int, attempt: int, seq: int, text: str) -> None:
    """Idempotent: a chunk sent again (its commit went through, the answer was lost with the
    connection) is already there and is ignored."""
    with connection.cursor() as cursor:
        cursor.execute(_APPEND, [step_id, attempt, seq, text, f"{step_id}:{attempt}"])


def add_late_note(steps: list[tuple[int, int]], text: str) -> None:
    """A `[ciproject]` line at the end of these step attempts' logs (step id, attempt), after
    anything their agent may still write: why the server ended them."""
    with transaction.atomic():  # the notifications go out with the notes' commit
        StepLogChunk.objects.bulk_create(
            StepLogChunk(
                step_id=step_id, attempt=attempt, seq=LATE_NOTE_SEQ, text=f"\n[ciproject] {text}\n"
            )
            for step_id, attempt in steps
        )
        with connection.cursor() as cursor:
            for step_id, attempt in steps:
                cursor.execute("SELECT pg_notify(%s, %s)", [LOG_CHANNEL, f"{step_id}:{attempt}"])


def step_log(step: StepRun, attempt: int | None = None) -> str:
    chunks = StepLogChunk.objects.filter(step=step, attempt=attempt or step.attempt)
    return "".join(chunks.values_list("text", flat=True))
