"""The tokens' errors. The authentication and scope refusals are DRF's own exception types
(DRF answers them before a view runs, with the WWW-Authenticate header), each with its
stable code; ciproject.api's handler writes them in the error format."""

from rest_framework import exceptions

from ciproject.errors import CIError


class TokenExpired(exceptions.AuthenticationFailed):
    default_code = "token_expired"
    default_detail = "this API token has expired: create a new one (README: Tokens)"


class TokenRevoked(exceptions.AuthenticationFailed):
    default_code = "token_revoked"
    default_detail = "this API token was revoked: create a new one (README: Tokens)"


class TokenScope(exceptions.PermissionDenied):
    default_code = "token_scope"
    default_detail = "this API token's scope does not allow this"


class TokenBeyondScope(CIError):
    """A token asked to make a token with more than it has itself."""

    code = "TOKEN_SCOPE"
    http_status = 403


class InvalidToken(CIError):
    code = "INVALID_TOKEN"  # a new token's name, days, actions or pipelines


class TokenNameTaken(CIError):
    code = "TOKEN_NAME_TAKEN"
    http_status = 409


class TokenAlreadyRevoked(CIError):
    code = "TOKEN_ALREADY_REVOKED"
    http_status = 409
