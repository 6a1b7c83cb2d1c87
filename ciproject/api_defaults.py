"""The classes REST_FRAMEWORK names as defaults: the JSON parser and the pagination.

DRF reads these settings while `rest_framework.views` is being imported, so this module
must not import views, generics or routers (ciproject.api does, for the router)."""

import codecs
import io

from django.conf import settings
from rest_framework import exceptions, pagination, parsers, status
from rest_framework.utils import json


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"
    default_detail = "the request body is too large"


def _unique_keys(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key[:40]!r}")
        obj[key] = value
    return obj


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, with a size limit, too deep nesting refused as a parse error, and
    duplicate keys refused (json would keep the last value and silently drop the others)."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.API_MAX_BODY_BYTES
        # Read one byte past the limit: this holds whatever Content-Length says (or omits).
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise RequestTooLarge(f"the request body is larger than {limit} bytes")
        encoding = parsers.get_encoding(parser_context or {})  # text codecs only
        try:
            reader = codecs.getreader(encoding)(io.BytesIO(body))
            return json.load(reader, object_pairs_hook=_unique_keys)  # refuses NaN, Infinity
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        except RecursionError:
            # [[[[... exhausts the stack rather than raising a ValueError.
            raise exceptions.ParseError("JSON parse error - nested too deeply") from None


class Pagination(pagination.LimitOffsetPagination):
    max_limit = 500  # ?limit= above this is capped, so one request cannot list a whole table
