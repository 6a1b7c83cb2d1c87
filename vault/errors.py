from ciproject.errors import CIError


class InvalidSecret(CIError):
    code = "INVALID_SECRET"


class SecretNotFound(CIError):
    code = "SECRET_NOT_FOUND"
    http_status = 404


class SecretKeyMissing(CIError):
    code = "SECRET_KEY_MISSING"
    http_status = 503
