"""`Authorization: Token <value>`, the header the API has always taken, against ApiToken.

Knox's TokenAuthentication parses the header; its credential check is replaced (see
tokens.models for why). An expired or revoked token is refused on the very request after:
nothing is cached. On success `user.api_token` is the token, and None for a session, so the
access rules can ask `user.api_token.allows(...)` without knowing how the user came in; and
`user.team_roles` is {team id: role} of the user's memberships, read in the same statement
(access.rules then decides a pipeline whose team ids it was read with without a query)."""

import binascii
from hmac import compare_digest

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox import auth
from knox.crypto import hash_token
from rest_framework import authentication, exceptions

from access.models import Membership
from tokens.errors import TokenExpired, TokenRevoked
from tokens.models import PREFIX_LENGTH, ApiToken

INVALID = "Invalid token."


User = get_user_model()
_TOKEN_FIELDS, _USER_FIELDS = ApiToken._meta.concrete_fields, User._meta.concrete_fields
_TOKEN_NAMES, _USER_NAMES = [f.attname for f in _TOKEN_FIELDS], [f.attname for f in _USER_FIELDS]
_LIMITED = ApiToken.pipelines.through._meta.db_table
# Every request asks it, so it is built once: the candidates by their readable prefix, each
# with its owner, its pipelines and its owner's memberships (what access.rules asks).
_LOOKUP = (
    "SELECT "
    + ", ".join([f"t.{f.column}" for f in _TOKEN_FIELDS] + [f"u.{f.column}" for f in _USER_FIELDS])
    + f", ARRAY(SELECT l.pipeline_id FROM {_LIMITED} l WHERE l.apitoken_id = t.id),"
    f" ARRAY(SELECT ARRAY[m.team_id, m.role] FROM {Membership._meta.db_table} m"
    "  WHERE m.user_id = u.id)"
    f" FROM {ApiToken._meta.db_table} t JOIN {User._meta.db_table} u ON u.id = t.user_id"
    " WHERE t.token_key = %s"
)


def _candidates(prefix: str):
    """(token with its user, its pipeline ids, the user's {team id: role}) for each token of
    that prefix."""
    with connection.cursor() as cursor:
        cursor.execute(_LOOKUP, [prefix])
        rows = cursor.fetchall()
    split = len(_TOKEN_FIELDS)
    for *values, pipelines, memberships in rows:
        token = ApiToken.from_db(connection.alias, _TOKEN_NAMES, values[:split])
        token.user = User.from_db(connection.alias, _USER_NAMES, values[split:])
        yield token, pipelines, dict(memberships)


class ApiTokenAuthentication(auth.TokenAuthentication):
    def authenticate_credentials(self, token: bytes):
        try:
            value = token.decode("ascii")
            digest = hash_token(value)
        except (UnicodeDecodeError, TypeError, binascii.Error):
            raise exceptions.AuthenticationFailed(INVALID) from None
        # The readable prefix finds the candidates; the digests are compared in constant
        # time, so the answer's timing says nothing of how much of a guess was right.
        found = None
        for candidate, pipelines, roles in _candidates(value[:PREFIX_LENGTH]):
            if compare_digest(digest, candidate.digest):
                found = candidate
                found.pipeline_ids_are(pipelines)
                found.user.team_roles = roles
        if found is None:
            raise exceptions.AuthenticationFailed(INVALID)
        now = timezone.now()
        if found.revoked_at is not None:
            raise TokenRevoked()
        if found.expired(now):
            raise TokenExpired()
        if not found.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        found.mark_used(now)
        found.user.api_token = found
        return found.user, found


class SessionAuthentication(authentication.SessionAuthentication):
    """DRF's, saying on the user that no token is in play."""

    def authenticate(self, request):
        result = super().authenticate(request)
        if result is not None:
            result[0].api_token = None
        return result


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = ApiTokenAuthentication
    name = "tokenAuth"  # as the schema has always called it

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Token VALUE`: an API token (README: Tokens)",
        }


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = SessionAuthentication
    name = "cookieAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "cookie", "name": "sessionid"}
