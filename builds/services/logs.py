"""Step logs: chunks the agents append, and the notes the server adds after them."""

from builds.models import StepLogChunk, StepRun

LATE_NOTE_SEQ = 1_000_000  # a note the server adds to a step's log sorts after the agent's


def append_log(step_id: int, attempt: int, seq: int, text: str) -> None:
    """Idempotent: a chunk sent again (its commit went through, the answer was lost with the
    connection) is already there and is ignored."""
    chunk = StepLogChunk(step_id=step_id, attempt=attempt, seq=seq, text=text)
    StepLogChunk.objects.bulk_create([chunk], ignore_conflicts=True)


def add_late_note(steps: list[tuple[int, int]], text: str) -> None:
    """A `[ciproject]` line at the end of these step attempts' logs (step id, attempt), after
    anything their agent may still write: why the server ended them."""
    StepLogChunk.objects.bulk_create(
        StepLogChunk(
            step_id=step_id, attempt=attempt, seq=LATE_NOTE_SEQ, text=f"\n[ciproject] {text}\n"
        )
        for step_id, attempt in steps
    )


def step_log(step: StepRun, attempt: int | None = None) -> str:
    chunks = StepLogChunk.objects.filter(step=step, attempt=attempt or step.attempt)
    return "".join(chunks.values_list("text", flat=True))
