"""What the management commands share."""

from contextlib import contextmanager

from django.core.management.base import CommandError

from ciproject.errors import CIError


@contextmanager
def reporting_errors():
    """A typed error becomes the command's error, `CODE: detail`, with no traceback."""
    try:
        yield
    except CIError as exc:
        raise CommandError(f"{exc.code}: {exc.detail}") from None
