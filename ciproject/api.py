"""What every API view shares: the error format and the router."""

from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.routers import DefaultRouter
from rest_framework.views import exception_handler as drf_exception_handler

from ciproject.errors import CIError

router = DefaultRouter()


def exception_handler(exc, context):
    """Every error is {"code": STABLE_CODE, "detail": "what happened", ...}."""
    if isinstance(exc, CIError):
        return Response({"code": exc.code, "detail": exc.detail, **exc.fields}, exc.http_status)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = {
            "code": "INVALID_REQUEST",
            "detail": "the request is not valid; see errors",
            "errors": response.data,
        }
    else:
        response.data = {"code": str(exc.default_code).upper(), "detail": str(exc.detail)}
    return response
