"""PostgreSQL advisory locks by name: one run of a piece of work at a time, across every
process and host that shares the database."""

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection

NAMESPACE = 0x43494350  # "CICP": the first key of the two-key form, ours alone


def lock_key(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@contextmanager
def try_advisory_lock(name: str) -> Iterator[bool]:
    """A session lock (not a transaction's, so the work inside may commit many times) taken
    without waiting: yields whether it was taken; released on leaving."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [NAMESPACE, lock_key(name)])
        acquired = cursor.fetchone()[0]
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [NAMESPACE, lock_key(name)])
