"""`Authorization: Token <value>`, the header the API has always taken, against ApiToken.

Knox's TokenAuthentication parses the header; its credential check is replaced (see
tokens.models for why). An expired or revoked token is refused on the very request after:
nothing is cached. On success `user.api_token` is the token, and None for a session, so the
access rules can ask `user.api_token.allows(...)` without knowing how the user came in."""

import binascii
from hmac import compare_digest

from django.contrib.postgres.aggregates import ArrayAgg
from django.db.models import Q
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox import auth
from knox.crypto import hash_token
from rest_framework import authentication, exceptions

from tokens.errors import TokenExpired, TokenRevoked
from tokens.models import PREFIX_LENGTH, ApiToken

INVALID = "Invalid token."


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
        candidates = ApiToken.objects.filter(token_key=value[:PREFIX_LENGTH])
        # Its pipelines in the same statement: every request asks them (access.rules).
        limited = ArrayAgg("pipelines", filter=Q(pipelines__isnull=False), default=[])
        for candidate in candidates.select_related("user").annotate(limited=limited):
            if compare_digest(digest, candidate.digest):
                found = candidate
                found.pipeline_ids_are(candidate.limited)
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
