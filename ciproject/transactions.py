"""Transactions PostgreSQL aborts to resolve a conflict (a deadlock, a serialization
failure) are run again: the work is one transaction, so nothing of the aborted try stays."""

import functools
import logging
import time

from django.db import OperationalError, connection

from ciproject.errors import DatabaseBusy

log = logging.getLogger(__name__)

CONFLICTS = {"40P01": "a deadlock", "40001": "a serialization failure"}
ATTEMPTS = 3


def conflict_of(exc: BaseException) -> str | None:
    """What conflict PostgreSQL aborted the transaction for, if it was one."""
    if isinstance(exc, OperationalError):
        return CONFLICTS.get(getattr(exc.__cause__, "sqlstate", None))
    return None


def retried_on_conflict(service):
    """Run `service` (one transaction) again when PostgreSQL aborts it for a conflict; after
    ATTEMPTS, DatabaseBusy (503, with Retry-After). Inside a caller's transaction nothing can
    be retried (that transaction is aborted): the error goes to the caller."""

    @functools.wraps(service)
    def run(*args, **kwargs):
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return service(*args, **kwargs)
            except OperationalError as exc:
                what = conflict_of(exc)
                if what is None or connection.in_atomic_block:
                    raise
                if attempt == ATTEMPTS:
                    raise DatabaseBusy(
                        f"the database aborted this {ATTEMPTS} times ({what} with other work);"
                        " nothing was done: retry"
                    ) from exc
                log.warning("%s: aborted by %s; trying again", service.__name__, what)
                time.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    return run
