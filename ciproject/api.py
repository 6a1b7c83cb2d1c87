"""What every API view shares: the error format and the router. The default parser and
pagination are in ciproject.api_defaults."""

import logging

from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from django.urls import re_path
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.routers import DefaultRouter
from rest_framework.views import APIView, set_rollback
from rest_framework.views import exception_handler as drf_exception_handler

from ciproject.api_defaults import RequestTooLarge
from ciproject.errors import CIError

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
        return [*super().get_urls(), re_path(r"^.*/$", _NotFound.as_view())]


router = Router()


def exception_handler(exc, context):
    """Every error is {"code": STABLE_CODE, "detail": "what happened", ...}."""
    if isinstance(exc, CIError):
        return Response({"code": exc.code, "detail": exc.detail, **exc.fields}, exc.http_status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, RequestDataTooBig):
        # DRF reads JSON through request.body, so Django's DATA_UPLOAD_MAX_MEMORY_SIZE can
        # refuse the body before our parser sees it.
        exc = RequestTooLarge()
    response = drf_exception_handler(exc, context)
    if response is None:
        # A bug, not bad input: log it with its traceback; the client gets no internals.
        logger.error("unhandled error in the API", exc_info=exc)
        set_rollback()
        return Response(
            {"code": "INTERNAL_ERROR", "detail": "an unexpected error; it has been logged"},
            status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    if isinstance(exc, exceptions.ValidationError):
        response.data = {
            "code": "INVALID_REQUEST",
            "detail": "the request is not valid; see errors",
            "errors": response.data,
        }
    else:
        response.data = {"code": str(exc.default_code).upper(), "detail": str(exc.detail)}
    return response
