"""The classes REST_FRAMEWORK names as defaults: the JSON parser and the pagination.

DRF reads these settings while `rest_framework.views` is being imported, so this module
must not import views, generics or routers (ciproject.api does, for the router)."""

import io

from django.conf import settings
from rest_framework import exceptions, pagination, parsers, status


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"
    default_detail = "the request body is too large"


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, with a size limit, and too deep nesting refused as a parse error."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.API_MAX_BODY_BYTES
        # Read one byte past the limit: this holds whatever Content-Length says (or omits).
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise RequestTooLarge(f"the request body is larger than {limit} bytes")
        try:
            return super().parse(io.BytesIO(body), media_type, parser_context)
        except RecursionError:
            # DRF turns only ValueError into ParseError; [[[[... exhausts the stack instead.
            raise exceptions.ParseError("JSON parse error - nested too deeply") from None


class Pagination(pagination.LimitOffsetPagination):
    max_limit = 500  # ?limit= above this is capped, so one request cannot list a whole table
