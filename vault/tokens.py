"""A job attempt's credential towards web (its artifacts' uploads and downloads): signed by
the server, so nothing is stored, and sealed to the agent process running the attempt with
its secrets (vault.services.seal_for_job), so it never travels in a message or reaches a
step. It names its attempt, and web takes it only while that attempt runs."""

from django.core import signing

SALT = "ciproject.job-attempt"


def for_attempt(job_id: int, attempt: int) -> str:
    return signing.Signer(salt=SALT).sign(f"{job_id}.{attempt}")


def attempt_of(token: str) -> tuple[int, int] | None:
    """(job id, attempt) of a token the server signed, or None."""
    try:
        job_id, attempt = signing.Signer(salt=SALT).unsign(token).split(".")
        return int(job_id), int(attempt)
    except (signing.BadSignature, ValueError):
        return None
