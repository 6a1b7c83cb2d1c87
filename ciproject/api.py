"""What every API view shares: the error format and the router. The default parser and
pagination are in ciproject.api_defaults."""

import logging

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404
from django.urls import re_path
from drf_spectacular import openapi
from rest_framework import exceptions, serializers
from rest_framework.response import Response
from rest_framework.routers import DefaultRouter
from rest_framework.views import APIView, set_rollback
from rest_framework.views import exception_handler as drf_exception_handler

from ciproject.api_defaults import RequestTooLarge
from ciproject.errors import (
    CIError,
    DatabaseBusy,
    DatabaseUnavailable,
    InternalError,
    InvalidRequest,
)
from ciproject.transactions import conflict_of

logger = logging.getLogger(__name__)


class _NotFound(APIView):
    """An unknown path under /api/ (/api/nope/, /api/builds/abc/) is a 404 in our format
    rather than Django's HTML page."""

    authentication_classes = permission_classes = ()
    schema = None  # not an endpoint

    def initial(self, request, *args, **kwargs):
        raise exceptions.NotFound()


class Router(DefaultRouter):
    def get_urls(self):
        # Last, and only for paths ending in "/", so APPEND_SLASH still redirects /api/builds/1.
        # [\s\S], not ".": a path with a newline (%0A) in it is ours too, not Django's HTML
        # 404. (Not (?s): Django's reverse() cannot read inline flags, in any pattern.)
        return [*super().get_urls(), re_path(r"^[\s\S]*/$", _NotFound.as_view())]


router = Router()


class ErrorSerializer(serializers.Serializer):
    """The body of every error (see exception_handler); some codes add fields, such as
    INVALID_REQUEST's `errors`."""

    code = serializers.CharField(help_text="stable, UPPER_SNAKE: what clients branch on")
    detail = serializers.CharField(help_text="what happened, for people")


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's schema plus the errors the handler answers for every operation, so
    the schema documents them; views declare only their own (a 409) with extend_schema."""

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        codes = [401, 403]  # token missing or wrong; a model permission missing
        if "{" in self.path:
            codes.append(404)
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer():
            codes += [400, 413, 415]  # invalid, too large, not JSON
        for code in map(str, codes):
            if code not in responses:
                responses[code] = self._get_response_for_code(
                    ErrorSerializer, code, None, direction
                )
        return dict(sorted(responses.items()))


def _database_unreachable(exc) -> bool:
    """A lost or refused connection (SQLSTATE class 08, a server shutting down, or no
    SQLSTATE: no server answered), not an error of a query such as a deadlock."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    sqlstate = getattr(exc.__cause__, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")


def exception_handler(exc, context):
    """Every error is {"code": STABLE_CODE, "detail": "what happened", ...}."""
    if isinstance(exc, CIError):
        return _answer(exc)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    elif isinstance(exc, RequestDataTooBig):
        # DRF reads JSON through request.body, so Django's DATA_UPLOAD_MAX_MEMORY_SIZE can
        # refuse the body before our parser sees it.
        exc = RequestTooLarge()
    response = drf_exception_handler(exc, context)
    if response is None and _database_unreachable(exc):
        # PostgreSQL restarting or out of reach. A trigger cut off at its commit may have
        # been written: a retry with its Idempotency-Key is safe either way.
        logger.warning("database unreachable: %s", exc)
        set_rollback()
        return _answer(DatabaseUnavailable("the database is unreachable; retry"))
    if response is None and (what := conflict_of(exc)):
        # Aborted for a conflict where no service retried it: rolled back, safe to resend.
        logger.warning("transaction aborted by %s: %s", what, exc)
        set_rollback()
        return _answer(DatabaseBusy(f"the database aborted this ({what}); nothing was done: retry"))
    if response is None:
        # A bug, not bad input: log it with its traceback; the client gets no internals.
        logger.error("unhandled error in the API", exc_info=exc)
        set_rollback()
        return _answer(InternalError("an unexpected error; it has been logged"))
    if isinstance(exc, exceptions.ValidationError):
        invalid = InvalidRequest("the request is not valid; see errors", errors=response.data)
        response.data = _body(invalid)
    else:
        response.data = {"code": str(exc.default_code).upper(), "detail": str(exc.detail)}
    return response


def _body(error: CIError) -> dict:
    return {"code": error.code, "detail": error.detail, **error.fields}


def _answer(error: CIError) -> Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return Response(_body(error), error.http_status, headers=headers)
